"""Streamed export (tensors read layer by layer from the torch_dist files) == model-built export.

The oracle is the pre-streaming path: build the 1-process model, load the whole checkpoint into it
(checkpoint_io.load_model) and export its state dict. Both must write the same files, byte for byte.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import tiny_config

REPO = Path(__file__).resolve().parents[2]


# multi-process, conversion or end-to-end CLI runs: `pytest -m "not slow"` skips them
pytestmark = pytest.mark.slow


def _saved_checkpoint(tmp_path: Path, layout, r: int, shared, qk_layernorm: bool = False) -> Path:
    """A real model-only torch_dist checkpoint of a tiny model with weights off their init."""
    from rexmoe_train.convert import checkpoint_io
    from rexmoe_train.model.gpt import build_model

    cfg = tiny_config(r=r, layers=4)
    cfg.model.moe_shared_expert_intermediate_size = shared
    if qk_layernorm:
        if not hasattr(cfg.model, "qk_layernorm"):
            pytest.skip("no model.qk_layernorm in this schema")
        cfg.model.qk_layernorm = True
    layout(cfg.parallel)
    model = build_model(cfg, 257)
    g = torch.Generator().manual_seed(r)
    with torch.no_grad():
        for p in model.chunks[0].parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return checkpoint_io.save_model(cfg, model, 257, tmp_path / "ckpt", step=7, source="test")


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _assert_same_export(a: Path, b: Path) -> None:
    from safetensors.torch import load_file

    fa, fb = _files(a), _files(b)
    assert sorted(fa) == sorted(fb)
    for name in fa:
        if name.endswith(".safetensors"):  # tensor by tensor first: a clearer failure
            ta, tb = load_file(str(a / name)), load_file(str(b / name))
            assert sorted(ta) == sorted(tb), name
            for key in ta:
                assert ta[key].dtype == tb[key].dtype and ta[key].shape == tb[key].shape, key
                assert torch.equal(ta[key].view(torch.uint8) if ta[key].numel() else ta[key],
                                   tb[key].view(torch.uint8) if tb[key].numel() else tb[key]), key
            # the safetensors header's __metadata__ map is serialised in hash order: compare it parsed
            ha, hb = (int.from_bytes(f[name][:8], "little") for f in (fa, fb))
            assert json.loads(fa[name][8:8 + ha]) == json.loads(fb[name][8:8 + hb]), name
            assert fa[name][8 + ha:] == fb[name][8 + hb:], f"{name}: tensor bytes differ"
        else:
            assert fa[name] == fb[name], f"{name} differs"


def _both_exports(ckpt: Path, out: Path, bf16: bool) -> None:
    from rexmoe_train.convert import checkpoint_io
    from rexmoe_train.convert.export import export_compact, export_hf

    cfg, model, meta = checkpoint_io.load_model(ckpt, bf16=bf16)
    state = model.chunks[0].state_dict()
    vocab = int(meta["model"]["model.vocab_size"])
    export_hf(cfg, state, model.vocab_size, out / "built", tokenizer_vocab_size=vocab, source="s",
              progress=False)
    export_compact(cfg, state, vocab, out / "built-compact", source="s", progress=False)
    del model, state

    scfg, streamed, _ = checkpoint_io.open_streamed(ckpt, bf16=bf16)
    assert scfg == cfg and streamed.padded_vocab == 320
    export_hf(scfg, streamed, streamed.padded_vocab, out / "streamed", tokenizer_vocab_size=vocab,
              source="s", progress=False)
    export_compact(scfg, streamed, vocab, out / "streamed-compact", source="s", progress=False)
    _assert_same_export(out / "built", out / "streamed")
    _assert_same_export(out / "built-compact", out / "streamed-compact")


@pytest.mark.parametrize("r,shared,bf16,qk", [(2, None, False, False), (4, 32, False, False),
                                              (4, 32, True, False), (2, None, True, True)])
def test_streamed_export_bitwise_equals_model_built(tmp_path, layout, r, shared, bf16, qk):
    ckpt = _saved_checkpoint(tmp_path, layout, r, shared, qk)
    _both_exports(ckpt, tmp_path, bf16)


def test_streamed_state_equals_loaded_model(tmp_path, layout):
    """Every tensor of the 1-process state dict, from its own part, bitwise; nothing else."""
    from rexmoe_train.convert import checkpoint_io

    ckpt = _saved_checkpoint(tmp_path, layout, 2, 32)
    _, model, _ = checkpoint_io.load_model(ckpt)
    want = {k: v for k, v in model.chunks[0].state_dict().items() if not k.endswith("_extra_state")}
    _, streamed, _ = checkpoint_io.open_streamed(ckpt)
    assert sorted(streamed.keys()) == sorted(want)
    for part, keys in streamed.parts.items():
        got = streamed.load_part(part)
        assert sorted(got) == sorted(keys)
        for k, v in got.items():
            assert v.dtype == want[k].dtype and torch.equal(v, want[k]), k
    assert len(streamed.parts["bank 0"]) == 2 * 2 * 8  # r*N experts x (fc1, fc2)


def test_bad_checkpoint_files_one_line(tmp_path, layout):
    from rexmoe_train.convert import checkpoint_io
    from rexmoe_train.convert.hf_format import ConvertError

    ckpt = _saved_checkpoint(tmp_path, layout, 2, None)
    iter_dir = checkpoint_io.resolve(ckpt)
    shard = sorted(iter_dir.glob("*.distcp"))[0]
    data = bytearray(shard.read_bytes())  # same size (a truncated file is caught by its recorded size)
    data[: len(data) // 2] = bytes(len(data) // 2)
    original = shard.read_bytes()
    shard.write_bytes(bytes(data))
    # the manifest's content digests catch it before any file is unpickled or read into tensors
    with pytest.raises(ConvertError, match=f"{shard.name} does not match its blake3 digest"):
        checkpoint_io.open_streamed(ckpt)
    # the reader's own one-line error for damage after the check (the shard changes once opened)
    shard.write_bytes(original)
    _, streamed, _ = checkpoint_io.open_streamed(ckpt)
    shard.write_bytes(bytes(data))
    with pytest.raises(ConvertError, match="cannot read"):
        for part in streamed.parts:
            streamed.load_part(part)
    metadata = iter_dir / ".metadata"
    metadata.write_bytes(bytes(metadata.stat().st_size))
    with pytest.raises(ConvertError, match=r"\.metadata does not match its blake3 digest"):
        checkpoint_io.open_streamed(ckpt)


def test_tensor_and_expert_parallel_checkpoint(tmp_path, megatron_world):
    """A checkpoint written by 2 processes at tp=2, ep=2: experts and tp-split weights (the SwiGLU
    fc1 as gate and up halves) saved as shards of the global tensors, the vocabulary padded for tp=2
    (384 rows; the 1-process model has 320)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    args = ["model.num_layers=4", "model.hidden_size=64", "model.moe_ffn_hidden_size=64",
            "model.moe_shared_expert_intermediate_size=32", "rexmoe.reuse_group_size=2",
            "train.seq_length=32", "train.micro_batch_size=2", "train.global_batch_size=4",
            "train.lr_warmup_iters=1", "train.train_iters=2", "train.eval_interval=100", "run.progress=false",
            "parallel.tensor_model_parallel_size=2", "parallel.expert_model_parallel_size=2",
            f"run.dir={tmp_path / 'run'}"]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "rexmoe_train.cli.train", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    _both_exports(tmp_path / "run" / "checkpoints", tmp_path, bf16=False)
