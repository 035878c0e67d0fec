"""wandb, tqdm and matplotlib are optional: the training path imports and runs without them (the GPU
check kit carries none of them), and asking for wandb without it fails in one line."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Runs in a fresh interpreter where the optional packages look uninstalled: a None entry in
# sys.modules makes `import x` raise ImportError and importlib.util.find_spec("x") return None
# (megatron itself tries `import wandb` and copes with the failure; torch probes for tqdm).
_SCRIPT = textwrap.dedent("""
    import sys, tempfile
    BLOCKED = {"wandb", "tqdm", "matplotlib"}
    for name in BLOCKED:
        sys.modules[name] = None
    from rexmoe_train import compat
    compat.install()
    import rexmoe_train.cli.train, rexmoe_train.training.trainer, rexmoe_train.convert.export  # noqa
    from rexmoe_train.config.schema import ConfigError, WandbConfig
    from rexmoe_train.training.run_logger import RunLogger

    loaded = {m for m in sys.modules if m.split(".")[0] in BLOCKED and sys.modules[m] is not None}
    assert not loaded, loaded
    with tempfile.TemporaryDirectory() as d:
        log = RunLogger(d + "/run", enabled=True, total_steps=3, progress=True,
                        wandb_cfg=WandbConfig(mode="disabled"))
        log.log({"step": 1, "loss": 2.0})
        log.progress(1, {"loss": 2.0})
        log.close()
        try:
            RunLogger(d + "/run2", enabled=True, total_steps=3, progress=False,
                      wandb_cfg=WandbConfig(mode="offline"))
        except ConfigError as err:
            print("ERROR:" + str(err))
        else:
            raise SystemExit("wandb mode offline without wandb did not fail")
""")


def test_training_path_needs_no_wandb_tqdm_or_matplotlib():
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "tqdm is not installed: no progress bar" in proc.stdout
    error = [line for line in proc.stdout.splitlines() if line.startswith("ERROR:")]
    assert len(error) == 1, proc.stdout
    assert "run.wandb.mode='offline'" in error[0] and "run.wandb.mode=disabled" in error[0]
