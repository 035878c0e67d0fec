"""Tracebacks nobody can act on, kept off the terminal: an exception raised in a destructor or a
finalizer (Python prints "Exception ignored in: ..." and a traceback: third-party ``__del__`` methods,
a writer process's pipe closed at exit) and an uncaught exception in a background thread. The CLIs
route them (``sys.unraisablehook``, ``threading.excepthook``) to a file in the run's log dir,
``<run.dir>/logs/<launch>/attempt<k>/rank<r>.stray.log``; what arrives before the run dir is known is
held in memory and written there once it is (or, if it never is, to a file in the temp dir at exit).
Torch-free."""

from __future__ import annotations

import atexit
import os
import sys
import tempfile
import threading
import time
import traceback
from typing import Optional

_state = {"path": None, "pending": [], "installed": False}
_lock = threading.Lock()


def _write(text: str, _os=os, _open=open, _lock=_lock, _state=_state) -> None:
    # the defaults keep what this needs alive while the interpreter tears modules down (a destructor
    # that raises at exit arrives when this module's globals may already be gone)
    with _lock:
        path: Optional[str] = _state["path"]
        if path is None:
            _state["pending"].append(text)
            return
        try:
            _os.makedirs(_os.path.dirname(path), exist_ok=True)
            with _open(path, "a") as f:
                f.write(text)
        except OSError:
            pass  # a stray error in a full or read-only run dir: not worth a traceback either


def _unraisable(hook, _write=_write, _format=traceback.format_exception, _time=time, _os=os) -> None:
    try:
        where = f"{hook.err_msg or 'Exception ignored in'}: {hook.object!r}"
        lines = _format(hook.exc_type, hook.exc_value, hook.exc_traceback)
        _write(f"--- {_time.strftime('%Y-%m-%d %H:%M:%S')} pid {_os.getpid()}: {where}\n" + "".join(lines))
    except BaseException:  # noqa: BLE001 -- late in shutdown modules are half gone: a failing hook prints
        pass


def _thread_exception(args) -> None:
    if args.exc_type is SystemExit:
        return  # as threading's own hook: a thread that exits is not an error
    try:
        name = args.thread.name if args.thread is not None else "a thread"
        lines = traceback.format_exception(args.exc_type, args.exc_value, args.exc_traceback)
        _write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} pid {os.getpid()}: uncaught exception in thread "
               f"{name}\n" + "".join(lines))
    except BaseException:  # noqa: BLE001
        pass


def _flush_at_exit() -> None:
    with _lock:
        pending, _state["pending"] = _state["pending"], []
    if pending and _state["path"] is None:
        _state["path"] = os.path.join(tempfile.gettempdir(), f"rexmoe-{os.getpid()}.stray.log")
    for text in pending:
        _write(text)


def route_stray_errors(path: Optional[str] = None) -> None:
    """Install the hooks (once per process); ``path``, when given, is where they write from now on."""
    if not _state["installed"]:
        sys.unraisablehook = _unraisable
        threading.excepthook = _thread_exception
        atexit.register(_flush_at_exit)
        _state["installed"] = True
    if path is not None:
        set_stray_log(path)


def set_stray_log(path: str) -> None:
    """The file the hooks write to; what they held until now is written there."""
    with _lock:
        _state["path"] = path
        pending, _state["pending"] = _state["pending"], []
    for text in pending:
        _write(text)


def stray_log_path(run_dir: str, rank: Optional[int] = None) -> str:
    from rexmoe_train.resilience.attempts import attempt_dir

    rank = int(os.environ.get("RANK", "0")) if rank is None else rank
    return str(attempt_dir(run_dir, "logs") / f"rank{rank}.stray.log")
