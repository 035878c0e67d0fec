"""Checkpoint errors: one line each, naming what is wrong (the CLI prints it and exits 2), and the
wording of the OS errors a save meets (a full disk, a read-only file system), whichever layer raised
them. Torch-free."""

from __future__ import annotations

import errno as errno_names
import os
import re
from pathlib import Path
from typing import Optional


class CheckpointError(RuntimeError):
    """A checkpoint cannot be saved or loaded. The message is one line naming what is wrong."""


_ERRNO_TEXT = re.compile(r"\[Errno (\d+)\] ([^:'\n]+)")


def os_error_behind(err: BaseException) -> Optional[OSError]:
    """The OSError behind ``err``: itself, a cause/context, or one of the per-rank failures torch's
    CheckpointException (a BaseException) collects as (exception, traceback) pairs. megatron's async
    file writer re-raises a worker's OSError as ``RuntimeError("Worker failure: [Errno 28] ...")``:
    the errno is read back from that text."""
    seen = set()
    stack = [err]
    while stack:
        e = stack.pop()
        if isinstance(e, tuple):  # torch's WRAPPED_EXCEPTION
            e = e[0] if e else None
        if not isinstance(e, BaseException) or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno is not None:
            return e
        found = _ERRNO_TEXT.search(str(e))
        if found:
            return OSError(int(found.group(1)), found.group(2).strip())
        stack += [e.__cause__, e.__context__]
        stack += list(getattr(e, "failures", {}).values())
    return None


def nearly_full(path: Path) -> bool:
    """Less than 1 MiB free where ``path`` lives (a full disk also surfaces without an errno)."""
    try:
        st = os.statvfs(path)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < (1 << 20)


def describe_os_error(err: OSError, fallback: Path) -> str:
    name = errno_names.errorcode.get(err.errno, str(err.errno))
    return f"{err.filename or fallback}: [{name}] {err.strerror or err}"


def save_failure(err: BaseException, tmp: Path, root: Path) -> str:
    """What went wrong in a save, in a few words: the path and errno for an OS error (a full disk
    reported without one counts as ENOSPC), else the exception's type and first 300 characters."""
    os_err = os_error_behind(err)
    if os_err is None and nearly_full(root):
        # a full disk also surfaces without an errno (torch's zip writer: "unexpected pos")
        os_err = OSError(errno_names.ENOSPC, os.strerror(errno_names.ENOSPC))
    if os_err is not None:
        return describe_os_error(os_err, tmp)
    return f"{tmp}: {type(err).__name__}: {' '.join(str(err).split())[:300]}"
