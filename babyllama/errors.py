"""One way to fail. Library code raises; a command's entry (`with one_line_errors():` around the body
of its main) turns an ordinary mistake into one line on stderr, `error: <what and where>`, instead of
a traceback. A bug still shows its traceback."""
from __future__ import annotations

import contextlib
import sys
import traceback
from collections.abc import Iterator


class UsageError(Exception):
    """The base of every ordinary mistake this project names itself: a setting, a file, a corpus, a
    checkpoint that does not fit. The message says what is wrong, where, and what is expected."""


class SettingError(UsageError):
    """A setting, a flag or a config file that is not what its field allows."""


# Besides our own: what the standard library and PyTorch raise for a user's file or value
# (a missing or unreadable file, text that is not UTF-8, JSON that does not parse).
ORDINARY_ERRORS = (UsageError, ValueError, FileNotFoundError, FileExistsError, NotADirectoryError,
                   IsADirectoryError, PermissionError)


@contextlib.contextmanager
def one_line_errors() -> Iterator[None]:
    """A command's main runs in this: an ordinary mistake ends the process with its message on one
    line of stderr and exit status 1 (2 for a setting, as argparse does); nothing else is caught."""
    try:
        yield
    except SettingError as e:  # read before any work starts: printed now
        print(f"error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    except ORDINARY_ERRORS as e:
        # Free what the failed frames held (an open progress bar closes and prints its last line), so
        # that the error is the last line.
        traceback.clear_frames(e.__traceback__)
        print(f"error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
