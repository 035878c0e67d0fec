"""rexmoe-plan: bad input is one line naming the field (exit 2); a plan's JSON has every key."""

from __future__ import annotations

import json

import pytest

from rexmoe_train.cli import plan as plan_cli

REQUIRED_KEYS = {"verdict", "gpu", "world_size", "peak_bytes", "per_rank", "traffic_bytes_per_step",
                 "step_time_s", "mfu", "suggestion", "assumptions"}


@pytest.mark.parametrize("argv, field", [
    (["--gpu", "a100"], "--gpu"),
    (["--spec", "fast"], "--spec"),
    (["parallel.expert_model_parallel_size=2", "--world-size", "3"], "--world-size=3"),
    (["--world-size", "0"], "--world-size=0"),
    (["model.hidden_size=-4"], "model.hidden_size"),
    (["model=nonexistent"], "model"),
    (["--headroom", "1.5"], "--headroom"),
])
def test_bad_input_is_one_line_and_exit_2(argv, field, capsys):
    assert plan_cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and field in err[0] and err[0].startswith("rexmoe-plan:")


def test_json_into_a_directory_is_refused(tmp_path, capsys):
    assert plan_cli.main(["--json", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err


@pytest.mark.slow
def test_plan_json_has_every_key(tmp_path, capsys):
    out = tmp_path / "plan.json"
    # overrides may come before, between and after the options (as rexmoe-train takes them)
    code = plan_cli.main(["train.global_batch_size=4", "--gpu", "cpu", "train.seq_length=256", "--no-suggest",
                          "--json", str(out), "model.num_layers=4"])
    assert code == 0
    result = json.loads(out.read_text())
    assert REQUIRED_KEYS <= set(result)
    assert result["verdict"] == "fits" and result["suggestion"] is None and result["world_size"] == 1
    assert "train.seq_length=256" in result["overrides"] and "model.num_layers=4" in result["overrides"]
    row = result["per_rank"][0]
    assert {"ranks", "peak_bytes", "by_category", "activations_by_module"} <= set(row)
    # where the activations go: every byte of the category attributed to a module, the banks among them
    assert sum(row["activations_by_module"].values()) == row["by_category"]["activations"]
    assert row["activations_by_module"].get("expert_banks.banks", 0) > 0
    assert any(name.startswith("layer.self_attention") for name in row["activations_by_module"])
    assert result["peak_bytes"] == max(r["peak_bytes"] for r in result["per_rank"])
    printed = capsys.readouterr().out
    assert "verdict: fits" in printed and "memory (MiB" in printed and "activations at the peak by module" in printed


def test_json_never_replaces_an_input_or_a_foreign_file(tmp_path, capsys):
    """tools/outputs.py's guard, before any simulation (issue 31): an input named by an override, a
    file rexmoe-plan did not write (even with --overwrite) -> one line, exit 2, the file unchanged."""
    data = tmp_path / "blend.bin"
    data.write_bytes(b"corpus")
    assert plan_cli.main([f"data.blend=[{data}]", f"data.tokenizer={data}", "--json", str(data)]) == 2
    assert "--json" in capsys.readouterr().err and data.read_bytes() == b"corpus"
    foreign = tmp_path / "notes.json"
    foreign.write_text('{"mine": true}')
    assert plan_cli.main(["--json", str(foreign), "--overwrite"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "was not written by rexmoe-plan" in err[0]
    assert foreign.read_text() == '{"mine": true}'
