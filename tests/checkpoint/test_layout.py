"""checkpoint/layout.py: the pointer, the manifest's file list, pruning and stale-dir cleanup (torch-free)."""

from __future__ import annotations

import json

import pytest

from rexmoe_train.checkpoint import layout
from rexmoe_train.checkpoint.errors import CheckpointError


def _fake_checkpoint(root, step, files=None):
    d = root / layout.iter_name(step)
    d.mkdir(parents=True)
    for name, data in (files or {"__0_0.distcp": b"x" * 10, "common.pt": b"y"}).items():
        (d / name).write_bytes(data)
    layout.write_manifest(d, {"format": layout.FORMAT_VERSION, "step": step, "model": {}, "parallel": {}})
    return d


def test_pointer_roundtrip_and_bad_pointers(tmp_path):
    layout.replace_pointer(tmp_path, 12)
    assert layout.read_tracker(tmp_path) == 12
    assert not (tmp_path / (layout.TRACKER + ".tmp")).exists()
    (tmp_path / layout.TRACKER).write_text("twelve\n")
    with pytest.raises(CheckpointError, match=r"must hold a step number \(ASCII digits\), found b'twelve"):
        layout.read_tracker(tmp_path)


def test_manifest_lists_every_file_and_detects_a_truncated_one(tmp_path):
    d = _fake_checkpoint(tmp_path, 3)
    meta = layout.read_metadata(d)
    assert {name: entry["size"] for name, entry in meta["files"].items()} == {"__0_0.distcp": 10, "common.pt": 1}
    assert all(len(entry["blake3"]) == 64 for entry in meta["files"].values())
    (d / "__0_0.distcp").write_bytes(b"x" * 9)
    with pytest.raises(CheckpointError, match=r"damaged: __0_0.distcp has 9 bytes, expected 10"):
        layout.read_metadata(d)
    (d / "__0_0.distcp").write_bytes(b"x" * 10)
    (d / "common.pt").unlink()
    with pytest.raises(CheckpointError, match="incomplete: common.pt is missing"):
        layout.read_metadata(d)
    (d / layout.META).write_text(json.dumps({"format": 99}))
    with pytest.raises(CheckpointError, match="unknown format 99"):
        layout.read_metadata(d)


def test_prune_keeps_the_newest_and_later_timelines(tmp_path):
    for step in (2, 4, 6, 8, 10):
        _fake_checkpoint(tmp_path, step)
    layout.prune(tmp_path, 6, keep_last_n=2)  # 6 was just saved: keep 4 and 6; 8 and 10 are another timeline
    assert sorted(p.name for p in tmp_path.glob("iter_*")) == [layout.iter_name(s) for s in (4, 6, 8, 10)]
    layout.prune(tmp_path, 6, keep_last_n=None)
    assert len(list(tmp_path.glob("iter_*"))) == 4


def test_stale_tmp_dirs_are_removed(tmp_path):
    (tmp_path / (layout.iter_name(4) + ".tmp")).mkdir()
    keep = _fake_checkpoint(tmp_path, 2)
    layout.remove_stale_tmp(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [keep.name]


def test_prune_deletes_only_what_a_manifest_lists(tmp_path):
    """Issue 31: an iter_* dir without a manifest (not written by the project) and a file put into a
    checkpoint after its save are never deleted; a symlinked iter_* dir is not followed."""
    for step in (2, 4, 6):
        _fake_checkpoint(tmp_path, step)
    foreign = tmp_path / layout.iter_name(1)
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    (tmp_path / layout.iter_name(2) / "sub").mkdir()
    (tmp_path / layout.iter_name(2) / "sub" / "added.txt").write_text("mine too")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("x")
    (tmp_path / layout.iter_name(3)).symlink_to(elsewhere)
    layout.prune(tmp_path, 6, keep_last_n=1)
    assert (foreign / "notes.txt").read_text() == "mine"
    assert [str(p.relative_to(tmp_path)) for p in sorted((tmp_path / layout.iter_name(2)).rglob("*"))] == [
        f"{layout.iter_name(2)}/sub", f"{layout.iter_name(2)}/sub/added.txt"]  # the checkpoint's own files went
    assert not (tmp_path / layout.iter_name(4)).exists()
    assert (elsewhere / "keep.txt").exists() and (tmp_path / layout.iter_name(6) / layout.META).exists()


def test_pointer_to_a_file_or_a_symlink_loop_names_the_true_reason(tmp_path):
    (tmp_path / layout.iter_name(5)).write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match=r"iter_0000005 exists and is not a directory \(the pointer"):
        layout.read_metadata(tmp_path / layout.iter_name(5))
    (tmp_path / layout.iter_name(6)).symlink_to(tmp_path / layout.iter_name(6))
    with pytest.raises(CheckpointError, match=r"iter_0000006 is a symlink loop"):
        layout.read_metadata(tmp_path / layout.iter_name(6))
    with pytest.raises(CheckpointError, match=r"iter_0000007 does not exist \(the pointer"):
        layout.read_metadata(tmp_path / layout.iter_name(7))
    (tmp_path / "dangling").symlink_to(tmp_path / "gone")
    assert layout.why_not_a_dir(tmp_path / "dangling") == f"is a symlink to {tmp_path / 'gone'}, which does not exist"
    assert layout.why_not_a_dir(tmp_path / "absent") is None and layout.why_not_a_dir(tmp_path) is None
