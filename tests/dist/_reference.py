"""The 1-process reference runs that tests/dist and tests/dist4 compare their layouts against.

Not a test module (no test_ prefix): imported as tests.dist._reference by both launches.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch.distributed as dist

# What every reference run shares (on top of tests/training/test_checkpoint.py::TINY, which sets the
# tiny model and the PSR ramp rexmoe.psr.start_step=1 -> end_step=6): balance losses off (they are
# per-rank by design, so they would differ across layouts), the vocab padded to 384 rows both at tp=1
# and (with make_vocab_size_divisible_by=64) at tp=2, 5 steps with a checkpoint at step 3.
COMMON = ["train.train_iters=5", "checkpoint.save_interval=3", "rexmoe.balance.layer_aux_coeff=0",
          "rexmoe.balance.z_loss_coeff=0", "model.make_vocab_size_divisible_by=128"]
RAMP = (1, 6)  # rexmoe.psr.start_step / end_step of TINY: steps 4 and 5 are mid-ramp
COMPARED_STEPS = (4, 5)


def shared_dir() -> Path:
    box = [tempfile.mkdtemp(prefix="rexmoe-ckpt-") if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return Path(box[0])


def remove_shared_dir(base: Path) -> None:
    dist.barrier()
    if dist.get_rank() == 0:
        shutil.rmtree(base, ignore_errors=True)


def records(run_dir: Path) -> dict[int, dict]:
    """metrics.jsonl: step -> the training record (the one with lm_loss)."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines) if "lm_loss" in r}


def summary(recs: dict[int, dict]) -> dict:
    return {"lm_loss": {s: r["lm_loss"] for s, r in recs.items()},
            "grad_norm": {s: r["grad_norm"] for s, r in recs.items()},
            "psr_candidates": {s: r["psr_candidates"] for s, r in recs.items()},
            # aux-loss-free balancing runs only
            "expert_bias_range": {s: r.get("expert_bias_range") for s, r in recs.items()}}


def _run_reference(base: Path, overrides: list[str], fresh_adam: bool) -> dict:
    """The 1-process CLI runs of one reference, in this process's own session (no collectives):
    5 steps with a checkpoint at step 3, and with fresh_adam the same resumed from step 3 with
    checkpoint.load_optimizer=false (model + LR schedule + step, new Adam state) to step 5."""
    from rexmoe_train import checkpoint
    from tests.training.test_checkpoint import cli, finish

    ckpt = base / "one" / "checkpoints" / checkpoint.iter_name(3)
    rc, _, err = finish(cli(*COMMON, *overrides, f"run.dir={base / 'one'}", log=base / "logs" / "one"))
    if rc:
        return {"error": err[-3000:]}
    result = {"ckpt": ckpt, "straight": summary(records(base / "one")), "fresh": None}
    if fresh_adam:
        rc, _, err = finish(cli(*COMMON, *overrides, f"run.dir={base / 'fresh'}", f"checkpoint.load={ckpt}",
                                "checkpoint.load_optimizer=false", log=base / "logs" / "fresh"))
        if rc:
            return {"error": err[-3000:]}
        result["fresh"] = summary(records(base / "fresh"))
    return result


def one_process_references(specs: dict[str, tuple[Path, list[str], bool]]) -> dict[str, dict]:
    """name -> (base, overrides, fresh_adam) for each reference: the 1-process runs that the layouts
    are compared with. Dealt round-robin over the ranks, which run their shares at the same time (a
    reference is one process: rank 0 alone would leave the other cores idle), then gathered, so
    every rank gets {name: {"ckpt", "straight": summary, "fresh": summary or None}}."""
    names, rank, world = list(specs), dist.get_rank(), dist.get_world_size()
    mine = {name: _run_reference(*specs[name]) for name in names[rank::world]}
    gathered: list = [None] * world
    dist.all_gather_object(gathered, mine)
    refs = {name: ref for share in gathered for name, ref in share.items()}
    for name in names:
        ref = refs[name]
        assert "error" not in ref, (name, ref["error"])
        if ref["fresh"] is not None:  # the resumed run redoes step 4 from the same weights: bitwise
            assert all(ref["fresh"][k][4] == ref["straight"][k][4] for k in ("lm_loss", "grad_norm")), (name, ref)
    return {name: refs[name] for name in names}


def one_process_reference(base: Path, overrides: list[str], fresh_adam: bool = True) -> dict:
    """One reference (see one_process_references), run by rank 0 while the other ranks wait."""
    return one_process_references({"reference": (base, overrides, fresh_adam)})["reference"]


def rel_err(got: float, want: float) -> float:
    return abs(got - want) / abs(want)


def assert_matches(tag: str, got: dict, want: dict) -> None:
    """lm_loss and grad_norm of each step in `want` (step -> reference summary) within 1e-5 of
    `got` (a summary); rank 0 prints every comparison under `tag`."""
    for step, summary in sorted(want.items()):
        for key in ("lm_loss", "grad_norm"):
            rel = rel_err(got[key][step], summary[key][step])
            if dist.get_rank() == 0:
                print(f"{tag}: step {step} {key} {got[key][step]:.7f} vs {summary[key][step]:.7f}, "
                      f"rel err {rel:.1e}")
            assert rel <= 1e-5, (tag, step, key, got[key][step], summary[key][step], rel)


def check_mid_ramp(candidates: dict[int, int], experts: int, r: int) -> None:
    """PSR masking is active at the compared steps: N < N_t < r*N."""
    for step in COMPARED_STEPS:
        assert experts < candidates[step] < r * experts, (step, candidates[step], experts, r)


def assert_replicas_equal(trainer) -> None:
    """Every replica of a parameter holds the same values after training: dense parameters across
    the data-parallel group, expert parameters across the expert-data-parallel group (e.g. the two
    tensor-parallel ranks at tp=2 with expert_tensor_parallel_size=1 and ep=1)."""
    import torch
    from megatron.core import parallel_state as ps

    groups = {"dense": ps.get_data_parallel_group(with_context_parallel=True),
              "expert": ps.get_expert_data_parallel_group()}
    for kind, group in groups.items():
        size = dist.get_world_size(group)
        if size == 1:
            continue
        names, sums = [], []
        for i, chunk in enumerate(trainer.model.chunks):
            for name, p in chunk.named_parameters():
                if ("expert_banks" in name) == (kind == "expert"):
                    names.append(f"{i}.{name}")
                    sums.append(torch.stack([p.detach().double().sum(), p.detach().double().pow(2).sum()]))
        local = torch.stack(sums)
        gathered = [torch.zeros_like(local) for _ in range(size)]
        dist.all_gather(gathered, local, group=group)
        differ = [n for j, n in enumerate(names) if any(not torch.equal(g[j], gathered[0][j]) for g in gathered)]
        assert not differ, f"{kind} replicas differ across ranks {dist.get_process_group_ranks(group)}: " \
                           f"{len(differ)} params, e.g. {differ[:3]}"


def assert_expert_bias_replicas_equal(trainer) -> None:
    """Aux-loss-free balancing: every rank of a pipeline stage (its tp x dp x cp ranks, ep included)
    holds bitwise the same selection biases after training."""
    import torch
    from megatron.core import parallel_state as ps

    biases = [router.expert_bias for router in trainer.model.routers]
    assert biases and all(b is not None for b in biases)
    local = torch.cat(biases)
    group = ps.get_tensor_and_data_parallel_group(with_context_parallel=True)
    gathered = [torch.zeros_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, local, group=group)
    assert len(gathered) >= 1 and local.abs().max() > 0
    assert all(torch.equal(g, gathered[0]) for g in gathered), \
        f"expert biases differ across ranks {dist.get_process_group_ranks(group)}"
