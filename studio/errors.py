"""Turning the errors a user can meet on the command line into one line that says what to do.

``peft-studio`` wraps every sub-command once (``cli.main``): an error that comes from the world
rather than from a bug — the history database locked, read-only or damaged, a full disk, a
folder that cannot be written — is printed as ``peft-studio <command>: <line>`` with exit code
2, never as a traceback. Anything ``describe`` does not recognise is a bug and keeps its
traceback, which is what a bug report needs.

Nothing heavy is imported here: sqlalchemy and sqlite3 errors are recognised through the
modules already loaded (an exception of a module never imported cannot have been raised).
"""

from __future__ import annotations

import errno
import sys

from studio import config

NO_SPACE = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)  # EFBIG: a file-size limit, as good as full
# The same said in text, by libraries that wrap the errno away: SQLite ("database or disk is
# full"), safetensors' Rust errors ("StorageFull", "os error 28"; 122 is EDQUOT).
NO_SPACE_WORDS = ("no space left", "disk is full", "storagefull", "file too large", "quota exceeded",
                  "os error 28", "os error 122")


def history_path() -> str:
    """Where the history file is, without creating any folder (the disk may be full)."""
    return str(config.studio_home() / "projects" / "studio.db")


def exception_chain(error: BaseException):
    """``error`` and everything it wraps, each once: ``__cause__``, ``__context__`` and
    SQLAlchemy's ``orig`` (the driver's own exception). Libraries wrap the error that says what
    happened (an OSError's errno, SQLite's code) in their own, so a diagnosis must look at all."""
    seen: set[int] = set()
    pending: list[BaseException | None] = [error]
    while pending:
        exc = pending.pop()
        if exc is None or id(exc) in seen:
            continue
        seen.add(id(exc))
        yield exc
        pending += [getattr(exc, "orig", None), exc.__cause__, exc.__context__]


def is_out_of_space(exc: BaseException) -> bool:
    """An error that means the disk (or a size limit) is full, from whichever layer raised it:
    OSError's errno, SQLite's "database or disk is full", safetensors' Rust "StorageFull"."""
    for link in exception_chain(exc):
        if isinstance(link, OSError) and link.errno in NO_SPACE:
            return True
        if any(word in str(link).lower() for word in NO_SPACE_WORDS):
            return True
    return False


def _sqlite_line(message: str) -> str:
    text = message.lower()
    where = f"the history database {history_path()}"
    if "locked" in text or "busy" in text:
        return (f"{where} is locked by another process (waited 10 s for it), so the command "
                "stopped there; the file is fine. Try again in a moment.")
    if "readonly" in text or "read-only" in text:
        return (f"{where} is read-only, so the command stopped there. Make the file and its folder "
                "writable (or run as the user who owns them).")
    if "full" in text:
        return f"the disk holding {where} is full, so the command stopped there. Free some space and retry."
    if "malformed" in text or "not a database" in text:
        return (f"{where} is damaged ({message.strip()}). Keep a copy of it before trying anything "
                "else.")
    return f"{where} cannot be used: {message.strip()}"


def _os_line(exc: OSError) -> str:
    where = f" ({exc.filename})" if exc.filename else ""
    if exc.errno in NO_SPACE:
        return f"no space left on the disk{where}. Free some space and retry."
    if exc.errno in (errno.EACCES, errno.EPERM):
        return f"permission denied{where}: choose a folder you can write, or fix its permissions."
    if exc.errno == errno.EROFS:
        return f"the file system is read-only{where}."
    return f"{exc.strerror or exc}{where}"


def describe(exc: BaseException) -> str | None:
    """One line for an error from the world, or None for a bug (keep the traceback)."""
    from studio.db import DatabaseError  # ours: the message already names the file and why

    if isinstance(exc, DatabaseError):
        cause = exc.__cause__ or exc.__context__
        if type(exc) is DatabaseError and cause is not None and describe(cause) is not None:
            return describe(cause)  # "locked" or "read-only" at opening: say that, not "damaged"
        return str(exc)
    sqlalchemy_exc = sys.modules.get("sqlalchemy.exc")
    if sqlalchemy_exc is not None and isinstance(exc, sqlalchemy_exc.DBAPIError):
        return _sqlite_line(str(exc.orig))
    sqlite3 = sys.modules.get("sqlite3")
    if sqlite3 is not None and isinstance(exc, sqlite3.Error):
        return _sqlite_line(str(exc))
    if isinstance(exc, OSError):
        return _os_line(exc)
    if is_out_of_space(exc):  # e.g. safetensors' own error type for a full disk
        return f"no space left on the disk ({exc}). Free some space and retry."
    return None
