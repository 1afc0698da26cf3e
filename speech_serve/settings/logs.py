"""How the service's logs are written (Serve's own `logging_config`, applied to every deployment)."""

from __future__ import annotations

from typing import Any, Literal

from speech_serve.settings.base import Section


class LogSettings(Section):
    encoding: Literal["TEXT", "JSON"] | None = None
    """Log encoding of every deployment (merged into each one's Serve `logging_config`, so the internal
    deployments keep their access log off). JSON: one object per line with the replica, the request id and the
    message, for a log collector. null: Serve's default (TEXT, or the RAY_SERVE_LOG_ENCODING environment
    variable). Serve's controller and proxies take theirs from the config file's top-level `logging_config`
    (config/production.yaml sets both)."""

    def apply(self, options: dict[str, Any]) -> dict[str, Any]:
        """A deployment's options with this encoding in its logging_config (a copy; unchanged when null)."""
        if self.encoding is None:
            return options
        return {**options, "logging_config": {**options.get("logging_config", {}), "encoding": self.encoding}}
