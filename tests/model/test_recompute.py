"""Activation recompute (model.recompute_*) with reuse: a replayed forward counts nothing twice.

Full recompute (uniform, and block: recomputed layers before plain ones inside one reuse group)
and selective recompute of the MoE layer and the grouped bank's activation must train exactly as
without recompute: loss, grad norm, every balance loss, every router metric and the parameters after
two optimizer steps (two micro-batches per step, global-batch balance scope, group-pooled loss on).
"""

from __future__ import annotations

from tests.helpers import RECOMPUTE_SETTINGS, assert_same_training, tiny_config, train_with_recompute


def test_recompute_trains_exactly_as_without(megatron_world, tmp_path):
    cfg = tiny_config(r=4, layers=4)
    cfg.rexmoe.balance.group_aux_coeff = 1e-2
    cfg.rexmoe.balance.layer_aux_scope = "global_batch"  # running mean over the micro-batches
    cfg.run.progress = False
    cfg.train.eval_interval = 100
    runs = train_with_recompute(cfg, str(tmp_path), RECOMPUTE_SETTINGS)
    assert runs["none"][0][0]["group_load_balancing_loss"] > 0
    assert_same_training(runs)
    # the recomputed runs really replayed their routers in the backward pass
    plain_calls = runs["none"][2]
    assert plain_calls == 2 * 2 * 4  # steps x micro-batches x MoE layers
    assert runs["full_uniform_1"][2] == 2 * plain_calls
    assert runs["full_block_2"][2] == plain_calls * 3 // 2  # 2 of 4 layers recomputed
    assert runs["selective_moe"][2] == 2 * plain_calls
