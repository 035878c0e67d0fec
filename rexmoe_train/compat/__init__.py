"""Compatibility layers, installed explicitly (never on import). See :mod:`.megatron_cpu`."""

from rexmoe_train.compat.megatron_cpu import (
    CompatError,
    check_megatron_version,
    install,
    installed,
    patched_targets,
    require_installed,
    reset_megatron_global_state,
)

__all__ = [
    "CompatError", "check_megatron_version", "install", "installed", "patched_targets",
    "require_installed", "reset_megatron_global_state",
]
