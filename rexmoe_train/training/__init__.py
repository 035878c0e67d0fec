"""The trainer, optimizer, metrics and run directory. Megatron-facing, so the CPU compatibility
layer must already be installed."""

from rexmoe_train.compat import require_installed

require_installed()
