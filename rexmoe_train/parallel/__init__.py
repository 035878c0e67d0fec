"""Process groups (megatron parallel_state) and the ``rexmoe_dedup`` token dispatcher.
Megatron-facing, so the CPU compatibility layer must already be installed."""

from rexmoe_train.compat import require_installed

require_installed()
