"""tools/outputs.py: no writing CLI can destroy its input, a run dir or a checkpoint (issue 31).

Every CLI case runs in-process through the CLI's ``main(argv)`` on a synthetic checkpoint (a
manifest over a few bytes: the guard refuses before anything reads it), and checks the three things
a refusal owes: exit 2, one stderr line, and every input byte-for-byte as it was. One subprocess
case shows the real process path of rexmoe-convert."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rexmoe_train.checkpoint import layout
from rexmoe_train.tools import outputs

REPO = Path(__file__).resolve().parents[2]


def _checkpoint(root: Path, step: int = 2) -> Path:
    """A checkpoint root as the trainer leaves it: pointer + iter dir with a manifest."""
    d = root / layout.iter_name(step)
    d.mkdir(parents=True)
    (d / "__0_0.distcp").write_bytes(os.urandom(256))
    (d / layout.CONFIG).write_text("train: {}\n")
    layout.write_manifest(d, {"step": step, "model": {}, "parallel": {}})
    layout.replace_pointer(root, step)
    return root


@pytest.fixture
def run_dir(tmp_path) -> Path:
    """A live-looking run dir: lock, metrics, config and a checkpoint."""
    run = tmp_path / "run"
    _checkpoint(run / "checkpoints")
    (run / layout.LOCK).write_text("pid 1 on host h\n")
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 3.0}) + "\n")
    (run / "config.yaml").write_text("run: {}\n")
    return run


def _snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


def _refused(capsys, main, argv, needle: str, keep: Path) -> str:
    before = _snapshot(keep)
    try:
        rc = main(argv)
    except SystemExit as exit_:
        rc = exit_.code
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc == 2, (argv, err)
    assert len(err) == 1 and needle in err[0], (argv, err)
    assert _snapshot(keep) == before, f"{argv}: the input changed"
    return err[0]


# ----------------------------------------------------------------------------------------------
# the guard itself
# ----------------------------------------------------------------------------------------------
def test_same_inside_contains_and_symlinks(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (tmp_path / "link").symlink_to(src)
    with pytest.raises(outputs.OutputError, match="is the input"):
        outputs.check_against_inputs(tmp_path / "link", [src])
    with pytest.raises(outputs.OutputError, match="lies inside the input"):
        outputs.check_against_inputs(tmp_path / "link" / "out", [src])
    with pytest.raises(outputs.OutputError, match="contains the input"):
        outputs.check_against_inputs(tmp_path, [tmp_path / "link"])
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    with pytest.raises(outputs.OutputError, match="symlink loop"):
        outputs.check_against_inputs(tmp_path / "loop", [src])
    assert outputs.check_against_inputs(tmp_path / "sibling", [src]) == (tmp_path / "sibling").resolve()


def test_overwrite_replaces_only_its_own_marked_output(tmp_path):
    owner = "rexmoe-convert export-hf"

    def write(files):
        return lambda tmp: [(tmp / name).write_text(name) for name in files]

    out = tmp_path / "out"
    outputs.write_dir(out, owner, False, write(["a", "b"]))
    assert json.loads((out / outputs.MARKER).read_text()) == {"tool": owner, "files": ["a", "b"]}
    assert oct(out.stat().st_mode & 0o777) != oct(0o700)  # not mkdtemp's private mode
    with pytest.raises(outputs.OutputError, match="pass --overwrite"):
        outputs.write_dir(out, owner, False, write(["c"]))
    with pytest.raises(outputs.OutputError, match="was written by 'rexmoe-convert export-hf'"):
        outputs.write_dir(out, "rexmoe-convert upcycle", True, write(["c"]))
    outputs.write_dir(out, owner, True, write(["c"]))
    assert sorted(p.name for p in out.iterdir()) == [outputs.MARKER, "c"]
    (out / "notes.txt").write_text("mine")  # written since: the directory is no longer only ours
    with pytest.raises(outputs.OutputError, match="holds notes.txt, which rexmoe-convert export-hf did not"):
        outputs.write_dir(out, owner, True, write(["d"]))
    assert (out / "notes.txt").read_text() == "mine"
    # a failed write leaves the earlier output and no temp dir behind
    (out / "notes.txt").unlink()

    def boom(tmp):
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        outputs.write_dir(out, owner, True, boom)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (out / "c").read_text() == "c"
    # an existing OUT.partial is never touched (the temp dir has a fresh name)
    (tmp_path / "out.partial").mkdir()
    (tmp_path / "out.partial" / "precious").write_text("x")
    outputs.write_dir(out, owner, True, write(["e"]))
    assert (tmp_path / "out.partial" / "precious").read_text() == "x"


def test_unmarked_dirs_run_dirs_and_checkpoints_are_never_replaced(tmp_path, run_dir):
    unmarked = tmp_path / "mine"
    unmarked.mkdir()
    (unmarked / "x").write_text("x")
    for path, needle in [(unmarked, "a non-empty directory that rexmoe-plot did not write"),
                         (run_dir, f"a run dir (holds {layout.LOCK})"),
                         (run_dir / "checkpoints", f"a checkpoint directory (holds {layout.TRACKER})"),
                         (run_dir / "checkpoints" / layout.iter_name(2), f"a checkpoint (holds {layout.META})")]:
        with pytest.raises(outputs.OutputError, match=needle.replace("(", r"\(").replace(")", r"\)")):
            outputs.check_replaceable_dir(path, "rexmoe-plot", overwrite=True)
    with pytest.raises(outputs.OutputError, match="lies inside the checkpoint"):
        outputs.check_against_inputs(run_dir / "checkpoints" / "hf", [tmp_path / "elsewhere"])
    empty = tmp_path / "empty"
    empty.mkdir()
    assert outputs.check_replaceable_dir(empty, "rexmoe-plot", overwrite=False) == empty.resolve()


def test_output_file_rules(tmp_path):
    stamped = tmp_path / "old.json"
    stamped.write_text(json.dumps(outputs.stamp({"x": 1}, "rexmoe-eval")))
    foreign = tmp_path / "data.json"
    foreign.write_text("{}")
    check = outputs.check_output_file
    with pytest.raises(outputs.OutputError, match="pass --overwrite"):
        check(stamped, [], "rexmoe-eval", False)
    assert check(stamped, [], "rexmoe-eval", True) == stamped.resolve()
    with pytest.raises(outputs.OutputError, match="was not written by rexmoe-eval"):
        check(foreign, [], "rexmoe-eval", True)
    with pytest.raises(outputs.OutputError, match="is a directory"):
        check(tmp_path, [], "rexmoe-eval", True)
    with pytest.raises(outputs.OutputError, match="no such directory"):
        check(tmp_path / "missing" / "x.json", [], "rexmoe-eval", False)


# ----------------------------------------------------------------------------------------------
# every CLI that writes, in-process
# ----------------------------------------------------------------------------------------------
def test_convert_never_writes_over_its_input(tmp_path, run_dir, capsys):
    from rexmoe_train.cli.convert import main

    ckpt = run_dir / "checkpoints"
    other_run = tmp_path / "other"
    _checkpoint(other_run / "checkpoints")
    (other_run / layout.LOCK).write_text("pid 2 on host h\n")
    (tmp_path / "ckpt_link").symlink_to(ckpt)
    hf = tmp_path / "hf"
    _checkpoint(hf)  # any directory given as import-hf's input
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "weights.bin").write_text("someone else's")
    exported = tmp_path / "exported"
    outputs.write_dir(exported, "rexmoe-convert export-hf", False, lambda d: (d / "config.json").write_text("{}"))
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    tok = tmp_path / "tokenizer.json"
    tok.write_text("{}")
    cases = [  # (argv, needle, what must stay untouched)
        (["export-hf", str(ckpt), str(run_dir), "--overwrite"], "contains the input", run_dir),
        (["export-hf", str(ckpt), str(ckpt), "--overwrite"], "is the input", run_dir),
        (["upcycle", str(ckpt), str(ckpt), "-r", "2", "--overwrite"], "is the input", run_dir),
        (["import-hf", str(hf), str(hf), "--overwrite"], "is the input", hf),
        (["export-hf", str(ckpt), str(tmp_path / "ckpt_link"), "--overwrite"], "is the input", run_dir),
        (["export-hf", str(ckpt / layout.iter_name(2)), str(ckpt / "hf")], "lies inside the checkpoint", run_dir),
        (["export-hf", str(ckpt), str(ckpt / layout.iter_name(2) / "hf")], "lies inside the input", run_dir),
        (["export-hf", str(ckpt), str(other_run), "--overwrite"], f"a run dir (holds {layout.LOCK})", other_run),
        (["upcycle", str(ckpt), str(other_run / "checkpoints"), "-r", "2", "--overwrite"],
         "a checkpoint directory", other_run),
        (["export-hf", str(ckpt), str(theirs), "--overwrite"], "did not write", theirs),
        (["upcycle", str(ckpt), str(exported), "-r", "2", "--overwrite"],
         "was written by 'rexmoe-convert export-hf'", exported),
        (["export-hf", str(ckpt), str(exported)], "pass --overwrite", exported),
        (["export-hf", str(ckpt), str(tok), "--tokenizer", str(tok)], "is the input", tmp_path / "hf"),
        (["export-hf", str(ckpt), str(tmp_path / "loop")], "symlink loop", run_dir),
    ]
    for argv, needle, keep in cases:
        line = _refused(capsys, main, argv, needle, keep)
        assert line.startswith(f"rexmoe-convert {argv[0]}: "), line
    assert tok.read_text() == "{}"


def test_preprocess_never_writes_over_its_input(tmp_path, capsys):
    from rexmoe_train.cli.preprocess import main

    data = tmp_path / "data"
    data.mkdir()
    (data / "docs.json").write_text(json.dumps({"text": "hello"}) + "\n")
    (data / "tokenizer.json").write_text("{}")
    (data / "foreign.bin").write_text("not ours")
    common = ["--no-progress", "--workers", "1", "--overwrite"]
    cases = [
        (["-i", str(data / "docs.json"), "-o", str(data / "docs")], "is the input"),
        (["-i", str(data / "docs.json"), "-o", str(data / "tokenizer"), "-t", str(data / "tokenizer.json")],
         "is the input"),
        (["-i", str(data / "docs.json"), "-o", str(data / "foreign")], "was not written by rexmoe-preprocess"),
    ]
    for argv, needle in cases:
        _refused(capsys, main, argv + common, needle, data)
    # the library function refuses too (a lower layer, its own check)
    from rexmoe_train.data.preprocess import PreprocessError, preprocess

    with pytest.raises(PreprocessError, match="is the input"):
        preprocess([str(data / "docs.json")], str(data / "docs"), overwrite=True, progress=False)


def test_eval_checks_out_before_evaluating(tmp_path, run_dir, capsys):
    from rexmoe_train.cli.eval import main

    ckpt = run_dir / "checkpoints"
    existing_dir = tmp_path / "results"
    existing_dir.mkdir()
    foreign = tmp_path / "notes.json"
    foreign.write_text("{}")
    earlier = tmp_path / "earlier.json"
    earlier.write_text(json.dumps(outputs.stamp({}, "rexmoe-eval")))
    cases = [
        ([str(ckpt), "--out", str(existing_dir)], "is a directory"),
        ([str(ckpt), "--out", str(ckpt / "eval.json")], "lies inside the input"),
        ([str(ckpt), "--out", str(foreign), "--overwrite"], "was not written by rexmoe-eval"),
        ([str(ckpt), "--out", str(earlier)], "pass --overwrite"),
        ([str(ckpt), "--out", str(tmp_path / "missing" / "e.json")], "no such directory"),
    ]
    for argv, needle in cases:
        line = _refused(capsys, main, argv, needle, tmp_path)
        assert line.startswith("rexmoe-eval: --out "), line


def test_plot_out_rules(tmp_path, run_dir, capsys):
    from rexmoe_train.cli.plot import main

    unmarked = tmp_path / "figs"
    unmarked.mkdir()
    (unmarked / "report.pdf").write_text("mine")
    cases = [
        ([str(run_dir), "--out", str(run_dir)], "contains the input"),
        ([str(run_dir), "--out", str(run_dir / "checkpoints")], "a checkpoint directory"),
        ([str(run_dir), "--out", str(run_dir / "checkpoints" / "plots")], "lies inside the checkpoint"),
        ([str(run_dir), "--out", str(unmarked)], "did not write"),
    ]
    for argv, needle in cases:
        _refused(capsys, main, argv, needle, tmp_path)
    # its own earlier output is replaced, and the mark lists what it wrote
    assert main([str(run_dir)]) == 0 and main([str(run_dir)]) == 0
    assert outputs.marked_files(run_dir / "plots", "rexmoe-plot") == ["loss.png"]


def test_convert_subprocess_refuses_the_run_dir(run_dir):
    """The issue's first case through a real process: one line, exit 2, the run dir whole."""
    before = _snapshot(run_dir)
    proc = subprocess.run([sys.executable, "-m", "rexmoe_train.cli.convert", "export-hf",
                           str(run_dir / "checkpoints"), str(run_dir), "--overwrite"],
                          cwd=REPO, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "contains the input" in lines[0], proc.stderr
    assert _snapshot(run_dir) == before
