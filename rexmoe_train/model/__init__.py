"""The ReXMoE model on megatron-core: router, balance losses, expert banks, the ReXMoE layer and the
GPT builder. Megatron-facing, so the CPU compatibility layer must already be installed."""

from rexmoe_train.compat import require_installed

require_installed()
