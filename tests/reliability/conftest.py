"""The trained tiny checkpoint (2 steps, saved once per module) of tests/training/test_checkpoint.py."""

from tests.training.test_checkpoint import saved_checkpoint  # noqa: F401
