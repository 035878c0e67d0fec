"""rexmoe_train/checkpoint/errors.py: the OS error behind whatever a save raised, and its one-line
wording."""

from __future__ import annotations

from pathlib import Path

from rexmoe_train.checkpoint.errors import describe_os_error, os_error_behind, save_failure


def test_the_errno_is_found_through_causes_failures_and_text():
    direct = OSError(28, "No space left on device", "/ckpt/x")
    assert os_error_behind(direct) is direct
    try:
        try:
            raise direct
        except OSError as inner:
            raise RuntimeError("save failed") from inner
    except RuntimeError as outer:
        assert os_error_behind(outer) is direct

    class CollectsFailures(BaseException):  # torch's CheckpointException: rank -> (exc, traceback)
        failures = {1: (OSError(30, "Read-only file system"), None)}

    assert os_error_behind(CollectsFailures()).errno == 30
    # megatron's async writer re-raises a worker's OSError as text
    parsed = os_error_behind(RuntimeError("Worker failure: [Errno 28] No space left on device"))
    assert (parsed.errno, parsed.strerror) == (28, "No space left on device")
    assert os_error_behind(ValueError("no errno here")) is None


def test_wording(tmp_path):
    assert describe_os_error(OSError(28, "No space left on device", "/ckpt/a"), Path("/x")) == \
        "/ckpt/a: [ENOSPC] No space left on device"
    assert describe_os_error(OSError(30, "Read-only file system"), Path("/x")) == "/x: [EROFS] Read-only file system"
    assert save_failure(KeyError("k"), tmp_path / "iter.tmp", tmp_path) == f"{tmp_path / 'iter.tmp'}: KeyError: 'k'"
