"""Fault injection: the named points of a save, where the tests kill or break a process
(tests/training/test_checkpoint.py kills a trainer at each of them; tests/resilience/ the forked
writer). Production code only names the points; the hook does nothing unless a test installs one."""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

# in the training process, in the order a save passes them
SAVE_POINTS = ("start", "after_shards", "after_meta", "before_rename", "after_rename",
               "pointer_tmp", "after_pointer", "mid_prune")
# in the shard-writing process (forked for an async save), after this rank's shard files are written
# and before their digests: the save is not finalized, the pointer names the previous checkpoint
WRITER_POINTS = ("async_write",)
_fault_hook: Optional[Callable[[str, int], None]] = None


def set_fault_hook(hook: Optional[Callable[[str, int], None]]) -> None:
    """Test seam: ``hook(point, step)`` runs at each of SAVE_POINTS and WRITER_POINTS."""
    global _fault_hook
    _fault_hook = hook


def fault_point(point: str, step: int) -> None:
    if _fault_hook is not None:
        _fault_hook(point, step)
