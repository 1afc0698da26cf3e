"""The error every protocol adapter raises for client mistakes."""


class ProtocolError(ValueError):
    """The client broke the protocol. `code` goes into the error frame."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
