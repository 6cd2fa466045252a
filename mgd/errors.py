"""The one exception type for a user's mistake (bad option, missing file, wrong machine).

`mgd.cli.main` catches it and prints `mgd: error: <message>` on one line with a non-zero
exit; any other exception is a bug and keeps its traceback.
"""
from __future__ import annotations


class UsageError(Exception):
    """A user error, stated in one line that names the argument or file at fault."""
