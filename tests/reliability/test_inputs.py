"""Bad inputs without training: config ranges, the resume field table, the pointer file, manifests
(digest and signature) on a synthetic checkpoint directory, the run-dir lock, an empty text file.
Each asserts one line naming the field or path (docs/reliability.md counts these attacks)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rexmoe_train.checkpoint import layout, resume
from rexmoe_train.checkpoint.errors import CheckpointError
from rexmoe_train.config.compose import compose_experiment
from rexmoe_train.config.schema import ConfigError, ExperimentConfig

REPO = Path(__file__).resolve().parents[2]

# (override, the field the one-line error must name)
BAD_VALUES = [
    ("train.lr=inf", "train.lr="), ("train.lr=nan", "train.lr="), ("train.lr=-1", "train.lr="),
    ("train.min_lr=nan", "train.min_lr="), ("model.rotary_base=0", "model.rotary_base="),
    ("model.rotary_base=-5", "model.rotary_base="), ("train.adam_eps=-1e-8", "train.adam_eps="),
    ("train.adam_eps=0", "train.adam_eps="), ("train.adam_beta1=nan", "train.adam_beta1="),
    ("train.weight_decay=inf", "train.weight_decay="), ("train.clip_grad=nan", "train.clip_grad="),
    ("model.init_method_std=0", "model.init_method_std="), ("model.init_method_std=inf", "model.init_method_std="),
    ("model.norm_epsilon=nan", "model.norm_epsilon="), ("model.vocab_size=0", "model.vocab_size="),
    ("model.moe_expert_capacity_factor=inf", "model.moe_expert_capacity_factor="),
    ("model.max_position_embeddings=0", "model.max_position_embeddings="),
    ("rexmoe.balance.z_loss_coeff=nan", "rexmoe.balance.z_loss_coeff="),
    ("rexmoe.balance.moe_router_bias_update_rate=inf", "rexmoe.balance.moe_router_bias_update_rate="),
    ("rexmoe.psr.seed=-1", "rexmoe.psr.seed="), ("train.seed=-3", "train.seed="),
    ("checkpoint.exit_duration_mins=nan", "checkpoint.exit_duration_mins="),
    ("checkpoint.exit_duration_mins=inf", "checkpoint.exit_duration_mins="),
    ("data.valid_fraction=nan", "data.valid_fraction="), ("run.collapse_share=nan", "run.collapse_share="),
    ("train.lrr=1", "unknown field 'train.lrr'"),
    ("train.train_iters=99999999999999999999", "train.train_iters="),  # beyond int64 (issue 31)
    ("train.train_iters=2305843009213693952", "train.train_iters="),  # x global_batch_size beyond int64
]


@pytest.mark.parametrize("override,needle", BAD_VALUES, ids=[b[0] for b in BAD_VALUES])
def test_bad_value_is_one_line_naming_the_field(override, needle):
    with pytest.raises(ConfigError) as err:
        compose_experiment([override, "run.dir=unused"]).experiment.validate()
    message = str(err.value)
    assert needle in message and "\n" not in message, message


def test_every_config_field_has_a_resume_rule():
    """A field added to the schema must be placed in checkpoint/resume.py's table on purpose."""
    def leaves(cls, prefix=""):
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if dataclasses.is_dataclass(default):
                yield from leaves(type(default), prefix + f.name + ".")
            else:
                yield prefix + f.name

    prefixes = [p for p, _ in resume.RULES]
    undecided = [k for k in leaves(ExperimentConfig) if not any(k == p or k.startswith(p + ".") for p in prefixes)]
    assert not undecided
    # spot checks of the table's decisions
    assert resume.policy("train.lr") == "apply" and resume.policy("train.seed") == "refuse"
    assert resume.policy("rexmoe.psr.end_step") == "refuse" and resume.policy("model.moe_router_topk") == "refuse"
    assert resume.policy("rexmoe.gating") == "refuse" and resume.policy("run.dir") == "free"
    saved = dataclasses.asdict(ExperimentConfig())
    changed = dataclasses.asdict(ExperimentConfig())
    changed["train"]["lr"], changed["train"]["adam_eps"], changed["run"]["dir"] = 1e-4, 1e-6, "elsewhere"
    lines = resume.compare(saved, changed, "ckpt")
    assert [line.split(":")[0] for line in lines] == ["[resume] train.adam_eps", "[resume] train.lr"]
    changed["model"]["moe_router_topk"] = 1
    with pytest.raises(CheckpointError, match=r"model.moe_router_topk was 2, the config says 1") as err:
        resume.compare(saved, changed, "ckpt")
    assert "\n" not in str(err.value)
    # a checkpoint from before rexmoe.psr.mask_draw existed drew its masks per step: resuming it under
    # the nested default is refused, naming the override that continues it
    older = dataclasses.asdict(ExperimentConfig())
    del older["rexmoe"]["psr"]["mask_draw"]
    assert resume.compare(older, dataclasses.asdict(ExperimentConfig()), "ckpt") == []
    changed = dataclasses.asdict(ExperimentConfig())
    changed["rexmoe"]["psr"]["mask_draw"] = "nested"
    with pytest.raises(CheckpointError, match=r"rexmoe.psr.mask_draw was 'per_step', the config says 'nested'.*"
                                              r"resume with rexmoe.psr.mask_draw='per_step'"):
        resume.compare(older, changed, "ckpt")


@pytest.mark.parametrize("content", [b"12abc\n", b"\xff\xfe12\n", "\u00b2\n".encode(), b"", b"-3\n"],
                         ids=["non-digit", "non-utf8", "superscript-digit", "empty", "negative"])
def test_bad_pointer_file_is_one_line(tmp_path, content):
    (tmp_path / layout.TRACKER).write_bytes(content)
    with pytest.raises(CheckpointError) as err:
        layout.read_tracker(tmp_path)
    assert str(tmp_path / layout.TRACKER) in str(err.value) and "\n" not in str(err.value)


def _fake_checkpoint(root: Path) -> Path:
    ckpt = root / layout.iter_name(3)
    (ckpt / "sub").mkdir(parents=True)
    (ckpt / "__0_0.distcp").write_bytes(os.urandom(1 << 16))
    (ckpt / ".metadata").write_bytes(b"\x80\x04not-really-a-pickle")
    (ckpt / "sub" / "x.bin").write_bytes(b"abc")
    layout.write_manifest(ckpt, {"step": 3, "model": {}, "parallel": {}})
    return ckpt


def test_manifest_digest_and_signature(tmp_path, monkeypatch):
    monkeypatch.delenv(layout.KEY_ENV, raising=False)
    ckpt = _fake_checkpoint(tmp_path)
    assert layout.read_metadata(ckpt)["step"] == 3
    # same size, one byte changed deep inside the shard
    data = bytearray((ckpt / "__0_0.distcp").read_bytes())
    data[40000] ^= 0x01
    (ckpt / "__0_0.distcp").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"__0_0.distcp does not match its blake3 digest"):
        layout.read_metadata(ckpt)
    data[40000] ^= 0x01
    (ckpt / "__0_0.distcp").write_bytes(bytes(data))
    (ckpt / "planted.pt").write_bytes(b"x")  # a file the manifest does not name
    with pytest.raises(CheckpointError, match=r"planted.pt is not listed"):
        layout.read_metadata(ckpt)
    (ckpt / "planted.pt").unlink()
    # with a key: the unsigned manifest is refused; signed with another key too; the right key loads
    monkeypatch.setenv(layout.KEY_ENV, "secret-a")
    with pytest.raises(CheckpointError, match="is not signed and REXMOE_CHECKPOINT_KEY is set"):
        layout.read_metadata(ckpt)
    layout.write_manifest(ckpt, json.loads((ckpt / layout.META).read_text()))  # signed with secret-a
    assert layout.read_metadata(ckpt)["signature"]["alg"] == "hmac-sha256"
    monkeypatch.setenv(layout.KEY_ENV, "secret-b")
    with pytest.raises(CheckpointError, match="signature does not match"):
        layout.read_metadata(ckpt)
    monkeypatch.setenv(layout.KEY_ENV, "secret-a")
    meta = json.loads((ckpt / layout.META).read_text())
    meta["step"] = 4  # any edit of a signed manifest
    (ckpt / layout.META).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="signature does not match"):
        layout.read_metadata(ckpt)
    (ckpt / layout.META).write_bytes(b"\xff\xfe{")
    with pytest.raises(CheckpointError, match="is not valid JSON"):
        layout.read_metadata(ckpt)


HOLD = """
import sys, time
from rexmoe_train import compat; compat.install()
from rexmoe_train.training.run_lock import RunLock
lock = RunLock(sys.argv[1]); lock.acquire(); print("locked", flush=True); time.sleep(60)
"""


def test_run_dir_lock_names_the_holder(tmp_path):
    from rexmoe_train.training.run_lock import RunLock

    run_dir = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ConfigError) as err:
            RunLock(str(run_dir)).acquire()
        message = str(err.value)
        assert f"pid {holder.pid} on host" in message and "\n" not in message, message
    finally:
        holder.kill()
        holder.wait()
    time.sleep(0.1)
    lock = RunLock(str(run_dir))  # the kernel dropped the dead holder's lock: no stale lock file blocks
    lock.acquire()
    lock.release()
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="exists and is not a directory"):
        RunLock(str(tmp_path / "file")).acquire()


def test_preprocess_refuses_an_empty_text_file(tmp_path):
    from rexmoe_train.cli.preprocess import main

    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "ok.txt").write_text("some text\n")
    rc = main(["--input", str(tmp_path / "ok.txt"), str(tmp_path / "empty.txt"),
               "--output-prefix", str(tmp_path / "out" / "ds"), "--workers", "1", "--no-progress"])
    assert rc == 2 and not (tmp_path / "out").exists()


def test_run_dir_symlink_loop_or_dangling_link_names_the_true_reason(tmp_path):
    """Issue 31: a symlink loop as run.dir was reported as 'File exists' (mkdir's EEXIST)."""
    from rexmoe_train.training.run_lock import RunLock

    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    with pytest.raises(ConfigError, match="is a symlink loop"):
        RunLock(str(tmp_path / "loop")).acquire()
    (tmp_path / "dangling").symlink_to(tmp_path / "gone")
    with pytest.raises(ConfigError, match="which does not exist"):
        RunLock(str(tmp_path / "dangling")).acquire()
    assert not (tmp_path / "gone").exists()
