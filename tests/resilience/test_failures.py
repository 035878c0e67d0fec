"""resilience/failures.py: a crash is one line plus a traceback file; a lost peer is silent (exit 77)."""

from __future__ import annotations

import json

from rexmoe_train.exit_codes import ExitCode
from rexmoe_train.resilience.attempts import attempt_dir
from rexmoe_train.resilience.failures import is_peer_failure, record_crash


def _raised(err: BaseException) -> BaseException:
    try:
        raise err
    except BaseException as caught:  # noqa: BLE001
        return caught


def test_own_exception_is_one_line_and_a_traceback_file(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("REXMOE_LAUNCH_ID", "t")
    monkeypatch.delenv("REXMOE_LAUNCHER", raising=False)
    code = record_crash(_raised(ValueError("bad thing\nsecond line")), str(tmp_path), rank=2, step=7)
    assert code == ExitCode.FAILED
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("rexmoe-train: rank 2 failed at step 7: ValueError: bad thing")
    logs = attempt_dir(str(tmp_path), "logs", "t", 0)
    assert "Traceback" in (logs / "rank2.err").read_text()
    fate = json.loads((logs / "rank2.fate.json").read_text())
    assert fate == {"rank": 2, "step": 7, "peer_failure": False, "what": "ValueError: bad thing",
                    "traceback": str(logs / "rank2.err")}


def test_a_lost_peer_prints_nothing_and_exits_77(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("REXMOE_LAUNCH_ID", "t")
    err = RuntimeError("[gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:28044: Connection reset by peer")
    assert record_crash(_raised(err), str(tmp_path), rank=0, step=5) == ExitCode.PEER_FAILED
    assert capsys.readouterr().err == ""


def test_under_the_launcher_the_summary_is_the_launchers(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("REXMOE_LAUNCHER", "1")
    assert record_crash(_raised(KeyError("x")), str(tmp_path), rank=1, step=None) == ExitCode.FAILED
    assert capsys.readouterr().err == ""


def test_peer_failure_classification():
    import torch.distributed as dist

    assert is_peer_failure(dist.DistBackendError("NCCL communicator was aborted"))
    assert is_peer_failure(RuntimeError("Connection closed by peer [10.0.0.2]:1234"))
    assert not is_peer_failure(RuntimeError("injected fault on rank 3 at step 2"))
    assert not is_peer_failure(ValueError("Connection reset by peer"))  # not from a collective
