"""User-facing errors.

A :class:`CerberusError` carries a one-line message that says what is wrong and what to do.
The CLI prints it without a traceback and exits with code 2.
"""

from __future__ import annotations


class CerberusError(Exception):
    """A problem with the user's input (a file, a folder, a setting), not a bug."""


class ConfigError(CerberusError, ValueError):
    """A configuration value is invalid; the message names the key and the fix."""


class Stopped(SystemExit):
    """A run stopped by a signal (SIGTERM from a batch scheduler) after saving what lets it resume: the process
    exits with ``128 + signal`` (143 for SIGTERM), as a shell reports a process the signal ended."""

    def __init__(self, message: str, signum: int = 15):
        super().__init__(128 + signum)
        self.message = message
