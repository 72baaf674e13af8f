"""The plugin's user-facing errors and how its commands report them.

Every expected error (bad input, a file that is not what it should be) is a :class:`MtsslError` whose
message is one line naming the file (and line). Each ``mtssl-*`` command's ``main`` is wrapped in
:func:`cli`: such an error prints ``<command>: error: <message>`` on stderr and exits with code 1;
anything else is a bug and keeps its traceback.
"""

import functools
import os
import sys
from typing import Callable, Optional, Sequence


class MtsslError(Exception):
    """A user-facing error: its message names the file (and line) and says what is wrong."""


class ExportError(MtsslError, ValueError):
    """A checkpoint cannot be written in the asked format (wrong model, unsupported option)."""


class CheckpointLoadError(MtsslError, RuntimeError):
    """A checkpoint is missing, corrupt, truncated, or pickles something other than data."""


# Errors of the environment that name a file the user gave: reported like MtsslError, without traceback.
_USER_OS_ERRORS = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError, FileExistsError)


def one_line(err: BaseException) -> str:
    """``err`` as one line (the first line of its message, the file for an OSError)."""
    if isinstance(err, OSError) and err.filename is not None and not isinstance(err, MtsslError):
        return f"{err.filename}: {err.strerror or type(err).__name__}"
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def cli(main: Callable) -> Callable:
    """Wrap a command's ``main(argv=None)``: a user-facing error is one line on stderr and exit code 1."""

    @functools.wraps(main)
    def wrapper(argv: Optional[Sequence[str]] = None):
        try:
            return main(argv)
        except (MtsslError, *_USER_OS_ERRORS) as err:
            prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else main.__module__
            print(f"{prog}: error: {one_line(err)}", file=sys.stderr)
            sys.exit(1)

    return wrapper
