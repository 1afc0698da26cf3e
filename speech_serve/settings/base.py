"""What every settings class shares: unknown keys are refused (a typo in the YAML is an error, not
a silently ignored option)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")
