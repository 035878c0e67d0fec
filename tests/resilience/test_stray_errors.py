"""resilience/stray_errors.py: no traceback reaches the terminal from a destructor that raises
("Exception ignored in ...") or a background thread, during a real CLI run; they land in the run's
log dir instead (held until the run dir is known)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_a_raising_destructor_and_thread_in_a_cli_run_go_to_the_run_log(tmp_path):
    run_dir = tmp_path / "run"
    script = textwrap.dedent(f"""
        import sys, threading
        import rexmoe_train.cli.train as cli
        from rexmoe_train.config.schema import ExperimentConfig

        class Noisy:
            def __del__(self):
                raise ValueError("from __del__ of a third-party object")

        def boom():
            raise RuntimeError("from a background thread")

        validate = ExperimentConfig.validate

        def validate_with_litter(self, *a, **kw):
            Noisy()  # dies at once: Python reports it through sys.unraisablehook
            t = threading.Thread(target=boom, name="litter")
            t.start()
            t.join()
            return validate(self, *a, **kw)

        ExperimentConfig.validate = validate_with_litter
        kept_until_exit = Noisy()  # its __del__ runs (or is dropped by Python) at shutdown: never printed
        sys.exit(cli.main(["--check", "run.dir={run_dir}"]))
    """)
    env = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "REXMOE_LAUNCH_ID": "L"}
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # no "Exception ignored in", no thread traceback
    log = (run_dir / "logs" / "L" / "attempt0" / "rank0.stray.log").read_text()
    assert "Exception ignored" in log and "ValueError: from __del__ of a third-party object" in log
    assert "uncaught exception in thread litter" in log and "RuntimeError: from a background thread" in log
