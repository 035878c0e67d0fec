"""The real `rexmoe-convert` CLI on real training checkpoints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
TINY = ["model.num_layers=4", "model.hidden_size=64", "model.moe_ffn_hidden_size=64", "train.seq_length=32",
        "train.micro_batch_size=2", "train.global_batch_size=2", "train.lr_warmup_iters=1",
        "train.train_iters=2", "train.eval_interval=100", "run.progress=false"]


# multi-process, conversion or end-to-end CLI runs: `pytest -m "not slow"` skips them
pytestmark = pytest.mark.slow


def run(module: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="2")
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def convert(*args: str) -> subprocess.CompletedProcess:
    return run("rexmoe_train.cli.convert", *args)


@pytest.fixture(scope="module")
def vanilla_checkpoint(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("vanilla")
    proc = run("rexmoe_train.cli.train", *TINY, "rexmoe.reuse_group_size=1", f"run.dir={root / 'run'}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return root / "run" / "checkpoints"


def _logits(model, x):
    pos = torch.arange(x.shape[1]).unsqueeze(0).expand(x.shape[0], -1)
    chunk = model.chunks[0].eval()
    with torch.no_grad():
        return chunk(x, pos, None)


def test_upcycle_export_import_inspect(tmp_path, vanilla_checkpoint, megatron_world, capsys):
    """upcycle through the console script (the one success path run as a process), then export-hf,
    import-hf and inspect in-process through main(argv)."""
    from rexmoe_train.convert import checkpoint_io

    up = tmp_path / "up"
    proc = convert("upcycle", str(vanilla_checkpoint), str(up), "-r", "4")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "rexmoe-train checkpoint.load=" in proc.stdout

    # outputs equal at the step training resumes from (step 3: only the layers' own experts open)
    x = torch.randint(0, 257, (2, 16), generator=torch.Generator().manual_seed(0))
    _, vanilla, _ = checkpoint_io.load_model(vanilla_checkpoint)
    want = _logits(vanilla, x)
    cfg, upcycled, meta = checkpoint_io.load_model(up)
    assert cfg.rexmoe.reuse_group_size == 4 and meta["model_only"]
    upcycled.psr_state.set_step(meta["step"] + 1)
    torch.testing.assert_close(_logits(upcycled, x), want, rtol=0, atol=1e-6)

    # export -> import through the CLI: bitwise the same weights
    hf, back = tmp_path / "hf", tmp_path / "back"
    rc, out, err = convert_here(capsys, "export-hf", str(up), str(hf), "--quiet")
    assert rc == 0, err[-2000:]
    # trained on bytes: the byte tokenizer ships without being asked (tests/convert/test_export_tokenizer.py
    # checks its ids through transformers), and the model knows its end-of-document id
    assert "tokenizer byte (eos_token_id 256)" in out
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= {p.name for p in hf.iterdir()}
    assert json.loads((hf / "config.json").read_text())["eos_token_id"] == 256
    # weights readable by whoever may read config.json (safetensors alone writes 0600)
    umask = os.umask(0)
    os.umask(umask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in hf.iterdir()}
    assert modes["config.json"] == 0o666 & ~umask
    assert all(mode == modes["config.json"] for mode in modes.values()), modes
    rc, _, err = convert_here(capsys, "import-hf", str(hf), str(back), "--step", str(meta["step"]))
    assert rc == 0, err[-2000:]
    original = {k: v.clone() for k, v in upcycled.chunks[0].state_dict().items() if torch.is_tensor(v)}
    _, imported, _ = checkpoint_io.load_model(back)
    reloaded = {k: v for k, v in imported.chunks[0].state_dict().items() if torch.is_tensor(v)}
    assert set(reloaded) == set(original)
    assert all(torch.equal(reloaded[k], original[k]) for k in original)

    rc, out, err = convert_here(capsys, "inspect", str(up), "--ep", "2")
    assert rc == 0, err[-2000:]
    assert "r=4 (1 groups)" in out and "ExpertPlacement N=8 r=4 ep=2" in out
    assert "routers 8,192 (+6,144 vs vanilla" in out
    # each output is marked as the verb's own (what --overwrite may replace: tools/outputs.py)
    from rexmoe_train.tools.outputs import MARKER

    for path, verb in ((up, "upcycle"), (hf, "export-hf"), (back, "import-hf")):
        assert json.loads((path / MARKER).read_text())["tool"] == f"rexmoe-convert {verb}"


def convert_here(capsys, *args: str) -> tuple[int, str, str]:
    """`rexmoe-convert ARGS` in this process (megatron is imported once for the whole test)."""
    from rexmoe_train.cli.convert import main

    capsys.readouterr()
    try:
        rc = main(list(args))
    except SystemExit as exit_:  # argparse's own errors
        rc = exit_.code
    out, err = capsys.readouterr()
    return rc, out, err


def test_bad_inputs_one_line_exit_2(tmp_path, vanilla_checkpoint, megatron_world, capsys):
    """Bad inputs: wrong path, not a checkpoint, wrong architecture, mismatched r, corrupt file. In-process
    through main(argv): the same checks as the console script, without ~8 s of imports per case."""
    not_ckpt = tmp_path / "empty"
    not_ckpt.mkdir()
    corrupt = tmp_path / "corrupt"
    assert convert_here(capsys, "export-hf", str(vanilla_checkpoint), str(corrupt), "--quiet")[0] == 0
    shard = sorted(corrupt.glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:100])
    reused = tmp_path / "reused"
    assert convert_here(capsys, "upcycle", str(vanilla_checkpoint), str(reused), "-r", "2")[0] == 0
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    other = Tokenizer(models.BPE(unk_token="<unk>"))
    other.pre_tokenizer = pre_tokenizers.Whitespace()
    other.train_from_iterator(["a small corpus for a small tokenizer"] * 20,
                              trainers.BpeTrainer(vocab_size=60, special_tokens=["<unk>", "</s>"]))
    other.save(str(tmp_path / "other.json"))
    cases = [
        (["export-hf", str(tmp_path / "missing"), str(tmp_path / "o1")], "no such checkpoint directory"),
        (["inspect", str(not_ckpt)], "not a ReXMoE checkpoint"),
        (["import-hf", str(not_ckpt), str(tmp_path / "o2")], "only exports made by"),
        (["import-hf", str(corrupt), str(tmp_path / "o3")], "cannot read safetensors"),
        (["upcycle", str(reused), str(tmp_path / "o4"), "-r", "4"], "must be a vanilla MoE"),
        (["inspect", str(vanilla_checkpoint), "--ep", "3"], "--ep 3: the expert-parallel size must divide "
                                                            "model.num_moe_experts (8): one of 1, 2, 4, 8"),
        (["inspect", str(vanilla_checkpoint), "--ep", "x"], "argument --ep: invalid int value"),
        (["export-hf", str(vanilla_checkpoint), str(tmp_path / "o5"), "--tokenizer", str(tmp_path / "other.json")],
         "was trained with a vocabulary of 257 (data.tokenizer=byte)"),
        (["export-hf", str(vanilla_checkpoint), str(tmp_path / "o6"), "--tokenizer", str(tmp_path / "nope.json")],
         "no such file"),
        # an existing file as OUT: refused up front by the output guard (tools/outputs.py) since issue 31
        (["export-hf", str(vanilla_checkpoint), str(tmp_path / "other.json")], "is not a directory"),
    ]
    for args, message in cases:
        rc, _, err = convert_here(capsys, *args)
        lines = [line for line in err.splitlines() if line.strip()]
        assert rc == 2, (args, err[-1500:])
        assert len(lines) == 1 and message in lines[0], (args, err[-1500:])
        out = Path(args[2]) if len(args) > 2 and args[0] != "inspect" else None
        assert out is None or not out.exists() or out.is_file(), f"{args[0]} left output behind"
    assert not [p.name for p in tmp_path.iterdir() if ".partial" in p.name]  # no temp dir left either
