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
    assert record_crash(_raised(RuntimeError(GLOO_CLOSED)), str(tmp_path), rank=0, step=5) == ExitCode.PEER_FAILED
    assert capsys.readouterr().err == ""


def test_a_ranks_own_bug_that_mentions_a_timeout_or_nccl_is_its_own_failure(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("REXMOE_LAUNCH_ID", "t")
    monkeypatch.delenv("REXMOE_LAUNCHER", raising=False)
    err = RuntimeError("data loader worker timed out: timeout after 120 s reading shard 7 (nccl_bench.bin)")
    assert record_crash(_raised(err), str(tmp_path), rank=3, step=9) == ExitCode.FAILED
    assert capsys.readouterr().err.startswith("rexmoe-train: rank 3 failed at step 9: RuntimeError: data loader")


def test_under_the_launcher_the_summary_is_the_launchers(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("REXMOE_LAUNCHER", "1")
    assert record_crash(_raised(KeyError("x")), str(tmp_path), rank=1, step=None) == ExitCode.FAILED
    assert capsys.readouterr().err == ""


# what torch 2.13 raises, verbatim (gloo: measured with two gloo processes, one exiting / one late)
GLOO_CLOSED = ("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer "
               "[127.0.0.1]:63113. This is typically caused by a remote worker crashing. Check the logs of the "
               "remote worker before reporting an error. GLHF!")
GLOO_TIMEOUT = ("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] Timed out "
                "waiting 3000ms for recv operation to complete")
NCCL_TIMEOUT = ("[Rank 0] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=64, OpType=ALLREDUCE, "
                "NumelIn=1, NumelOut=1, Timeout(ms)=600000) ran for 600081 milliseconds before timing out.")
NCCL_REMOTE = ("NCCL error in: /pytorch/torch/csrc/distributed/c10d/ProcessGroupNCCL.cpp:3356, remote process "
               "exited or there was a network error, NCCL version 2.27.5\nncclRemoteError: A call failed possibly "
               "due to a network error or a remote process exiting prematurely.")
NCCL_MISUSE = ("NCCL error in: /pytorch/torch/csrc/distributed/c10d/ProcessGroupNCCL.cpp:3356, invalid usage (run "
               "with NCCL_DEBUG=WARN for details), NCCL version 2.27.5\nncclInvalidUsage: This usually reflects "
               "invalid usage of NCCL library.")


def test_peer_failure_classification_by_type_and_structure():
    import torch.distributed as dist

    # a peer (or the store) went away
    assert is_peer_failure(RuntimeError(GLOO_CLOSED)) and is_peer_failure(RuntimeError(GLOO_TIMEOUT))
    assert is_peer_failure(dist.DistBackendError(NCCL_TIMEOUT)) and is_peer_failure(dist.DistBackendError(NCCL_REMOTE))
    assert is_peer_failure(dist.DistBackendError("NCCL communicator was aborted on rank 3."))
    assert is_peer_failure(dist.DistNetworkError("Connection reset by peer"))
    assert is_peer_failure(dist.DistStoreError("wait timeout after 600000ms, keys: /default_pg/0//cuda//0"))
    # this rank's own failure, whatever its words
    assert not is_peer_failure(dist.DistBackendError(NCCL_MISUSE))  # NCCL says: this rank misused it
    assert not is_peer_failure(RuntimeError("injected fault on rank 3 at step 2"))
    assert not is_peer_failure(RuntimeError("timeout waiting for the data server; nccl not involved"))
    assert not is_peer_failure(RuntimeError(NCCL_TIMEOUT))  # the words without c10d's error type
    assert not is_peer_failure(RuntimeError("Connection closed by peer [10.0.0.2]:1234"))  # not gloo's transport
    assert not is_peer_failure(TimeoutError("timed out"))
    assert not is_peer_failure(ValueError(GLOO_CLOSED))  # not raised by a collective
