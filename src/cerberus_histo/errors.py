"""User-facing errors.

A :class:`CerberusError` carries a one-line message that says what is wrong and what to do.
The CLI prints it without a traceback and exits with code 2.
"""

from __future__ import annotations


class CerberusError(Exception):
    """A problem with the user's input (a file, a folder, a setting), not a bug."""


class ConfigError(CerberusError, ValueError):
    """A configuration value is invalid; the message names the key and the fix."""
