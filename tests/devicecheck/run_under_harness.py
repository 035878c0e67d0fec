"""Run devicecheck suites under the strict-device harness:
``python -m tests.devicecheck.run_under_harness SUITE[,SUITE...] OUT_DIR`` (under torchrun for ep2).

Installs the harness before anything imports megatron, runs each ``scenarios.SUITES[name]`` (one
process pays the ~10 s import once) and writes ``OUT_DIR/<name>.rank<R>.json`` per suite:
``{"ok": true, "results": ...}`` or ``{"ok": false, "error": "<type>: <message>"}`` (traceback on
stderr). Exit code 1 if any suite failed.
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path


def main(argv: list[str]) -> int:
    import os

    names, out_dir = argv[0].split(","), Path(argv[1])
    out_dir.mkdir(parents=True, exist_ok=True)
    rank = int(os.environ.get("RANK", "0"))
    try:
        from tests.devicecheck import strict_device

        if os.environ.get("REXMOE_NCCL_SEMANTICS") == "1":  # collectives return before they complete
            from tests.devicecheck import nccl_semantics

            nccl_semantics.install()  # then the strict harness on top
        strict_device.install()  # compat + the device overlay, before the first megatron import
        # as on a GPU, memory nobody wrote is not zeros: every empty() is NaN (ints: their max), so a
        # read of uninitialised memory fails every run instead of now and then
        import torch

        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.utils.deterministic.fill_uninitialized_memory = True
        from rexmoe_train.parallel.state import init_distributed
        from tests.devicecheck import scenarios

        init_distributed()
    except BaseException as err:  # noqa: BLE001 - the set-up failed: every suite reports it
        traceback.print_exc()
        for name in names:
            (out_dir / f"{name}.rank{rank}.json").write_text(json.dumps(
                {"ok": False, "error": f"set-up: {type(err).__name__}: {err}"}))
        return 1
    code = 0
    for name in names:
        try:
            report = {"ok": True, "results": scenarios.SUITES[name](out_dir), "stats": dict(strict_device.STATS)}
        except BaseException as err:  # noqa: BLE001 - reported to the test, which fails with it
            traceback.print_exc()
            report = {"ok": False, "error": f"{type(err).__name__}: {err}"}
            code = 1
        (out_dir / f"{name}.rank{rank}.json").write_text(json.dumps(report, indent=1, default=str))
        if code:  # a failed collective suite leaves the ranks out of step: stop here
            break
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
