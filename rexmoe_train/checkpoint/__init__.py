"""Checkpoints: file layout and manifest (layout.py), whether a checkpoint fits a run
(compatibility.py), the Stateful parts of a run (state.py) and the manager that saves and resumes
them atomically (manager.py). docs/reliability.md states the guarantees.

layout, compatibility and errors are torch-free and used by the converters and ``rexmoe-eval``;
state and manager are megatron-facing (import them after ``rexmoe_train.compat.install()``).
"""

from rexmoe_train.checkpoint.errors import CheckpointError
from rexmoe_train.checkpoint.layout import CONFIG, META, TRACKER, iter_name, locate, read_metadata, read_tracker

__all__ = ["CONFIG", "META", "TRACKER", "CheckpointError", "iter_name", "locate", "read_metadata", "read_tracker"]
