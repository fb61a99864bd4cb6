"""The one exception type a user sees.

Everything that is the user's to fix (a bad path, a graph we cannot quantize, missing data) raises
:class:`OnnxqError` with a message that names the problem *and* the fix. The CLI prints it as one
line and exits non-zero; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class OnnxqError(Exception):
    """A problem with the user's input, stated together with what to do about it."""

    exit_code = 2

    def __init__(self, problem: str, fix: str | None = None) -> None:
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem}: {fix}" if fix else problem)
