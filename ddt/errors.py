"""The errors a user can fix: a setting or a file at fault, found before any work is done."""
from __future__ import annotations

import signal


class UsageError(ValueError):
    """One or more problems with what the user asked for; each is one line naming the key or file.

    launch.py prints them without a traceback and exits with status 2.
    """

    def __init__(self, problems: str | list[str]):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) or SIGTERM: the run saved what it could; exit 128 + the signal number."""

    def __init__(self, signum: int, where: str = ""):
        self.signum, self.where = signum, where
        super().__init__(f"{signal.Signals(signum).name}{f' {where}' if where else ''}")

    @property
    def exit_code(self) -> int:
        """130 for SIGINT, 143 for SIGTERM."""
        return 128 + self.signum
