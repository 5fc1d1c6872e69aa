"""User-facing errors.

`BertforgeError` carries a one-line message that names the bad input and the fix. The CLI prints it
as `error: <message>` and exits with status 2, never a traceback. Library code raises it for anything
a user can get wrong (paths, formats, configs); programming errors stay ordinary exceptions.
"""

from __future__ import annotations


class BertforgeError(Exception):
    """An input problem a user can fix; the message is one line naming the input and the fix."""


def require(condition: bool, message: str) -> None:
    """Raise `BertforgeError(message)` unless `condition` holds."""
    if not condition:
        raise BertforgeError(message)
