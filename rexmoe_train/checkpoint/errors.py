"""Checkpoint errors: one line each, naming what is wrong (the CLI prints it and exits 2)."""

from __future__ import annotations


class CheckpointError(RuntimeError):
    """A checkpoint cannot be saved or loaded. The message is one line naming what is wrong."""
