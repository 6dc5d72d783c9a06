"""Progress bars: on stderr, and only when stderr is a terminal.

The package's bars are made here (:func:`progress_bar`; training's Lightning bar asks :func:`show_progress`), so
that stdout holds a command's results alone and a log or a redirected stderr (``2> err.txt``) holds its messages and
warnings, never the carriage returns of a bar. ``progress=False`` turns a bar off on a terminal too.
"""

from __future__ import annotations

import sys


def stderr_is_terminal() -> bool:
    """True when ``sys.stderr`` is a terminal (not a file, a pipe or a closed stream)."""
    try:
        return bool(sys.stderr.isatty())
    except (AttributeError, ValueError, OSError):
        return False


def show_progress(progress: bool | None = True) -> bool:
    """Whether to show bars: asked for (``progress`` true or ``None``) and stderr is a terminal."""
    return progress is not False and stderr_is_terminal()


def progress_bar(iterable=None, *, progress: bool | None = True, **kwargs):
    """A tqdm bar over ``iterable`` (or one updated by hand) on stderr, disabled unless :func:`show_progress`."""
    from tqdm import tqdm

    return tqdm(iterable, file=sys.stderr, disable=not show_progress(progress), **kwargs)


__all__ = ["progress_bar", "show_progress", "stderr_is_terminal"]
