"""The one error of the adapter lifecycle that reaches the admin caller."""

from __future__ import annotations


class AdapterRejected(Exception):
    """An upload or an admin action that cannot proceed: `status` and `code` become the HTTP answer,
    the message says what is wrong and where."""

    def __init__(self, message: str, code: str = "invalid_adapter", status: int = 400,
                 param: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.status = status
        self.param = param  # the field at fault, when one is
