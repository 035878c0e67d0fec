"""The errors every layer may raise. Torch-free and import-free, so the core can raise them without
depending on the config layer (which re-exports :class:`ConfigError`)."""

from __future__ import annotations


class ConfigError(ValueError):
    """A config value is invalid. The message is one line naming the field and what is allowed."""
