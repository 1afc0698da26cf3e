"""WebSocket close codes (RFC 6455) the service ends a session with, in one place: the server closes
with them, clients and the load tools read them."""

CLOSE_NORMAL = 1000
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_UNSUPPORTED_DATA = 1003
CLOSE_POLICY = 1008  # policy violation: authentication refused, a limit passed (retrying will not help)
CLOSE_TOO_BIG = 1009
CLOSE_INTERNAL = 1011
CLOSE_SERVICE_RESTART = 1012  # the server is restarting; the client should reconnect
CLOSE_TRY_AGAIN_LATER = 1013  # server overloaded; retry with backoff

MAX_CLOSE_REASON_BYTES = 123  # a close frame's payload is 125 bytes: the code's 2, then the reason in UTF-8


def close_reason(text: str) -> str:
    """`text` cut to fit a close frame, in UTF-8 bytes and never inside a character: a longer reason
    fails the close, and the client sees 1006 (no code) instead of ours."""
    return text.encode("utf-8")[:MAX_CLOSE_REASON_BYTES].decode("utf-8", errors="ignore")
