"""tests/dist4 runs under torchrun with 4 processes (tests/test_distributed.py); plain pytest, which
is one process, does not collect it. megatron_world comes from tests/conftest.py."""

from __future__ import annotations

import os

collect_ignore_glob = [] if "TORCHELASTIC_RUN_ID" in os.environ else ["*.py"]
