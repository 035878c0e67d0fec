# megatron-core is imported below this package: install the platform layer first (no-op with CUDA).
from rexmoe_train import platform as _platform

_platform.setup()
