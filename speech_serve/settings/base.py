"""What every settings class shares: unknown keys are refused (a typo in the YAML is an error, not
a silently ignored option), and a field is described once, by the docstring under it (its
`description`: docs/configuration.md is generated from them)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)
