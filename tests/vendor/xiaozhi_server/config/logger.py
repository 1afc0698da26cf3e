"""SHIM of xiaozhi-esp32-server's config/logger.py (not its code).

Upstream, setup_logging() loads the server's config.yaml (config_loader, settings, a cache manager) and
sets up loguru sinks. The vendored modules only ever call `setup_logging().bind(tag=TAG).<level>(msg)`,
so here that goes to the standard logger "xiaozhi_server", where a test can read what they logged.
"""

import logging

_LOG = logging.getLogger("xiaozhi_server")


class _Tagged:
    def __init__(self, tag: str = "") -> None:
        self.tag = tag

    def bind(self, tag: str = "", **_extra) -> "_Tagged":
        return _Tagged(tag)

    def _log(self, level: int, message, *_args, exc_info=False, **_kwargs) -> None:
        _LOG.log(level, "[%s] %s", self.tag, message, exc_info=exc_info)

    def debug(self, message, *args, **kwargs) -> None:
        self._log(logging.DEBUG, message, *args, **kwargs)

    def info(self, message, *args, **kwargs) -> None:
        self._log(logging.INFO, message, *args, **kwargs)

    def warning(self, message, *args, **kwargs) -> None:
        self._log(logging.WARNING, message, *args, **kwargs)

    def error(self, message, *args, **kwargs) -> None:
        self._log(logging.ERROR, message, *args, **kwargs)


def setup_logging(config=None) -> _Tagged:
    return _Tagged()
