"""The fake world's rules: host bookkeeping stays real, model tensors stay fake, a shape-deciding
host read of a fake value fails loudly, and every patch is undone on exit."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, unset_fake_temporarily

from rexmoe_train.plan import fake_env
from rexmoe_train.plan.fake_env import DispatchLoad, HostReadError, HostReads, RealWhenAllReal
from rexmoe_train.plan.load import RoutingLoad


def test_real_inputs_compute_for_real_and_factories_stay_fake():
    with FakeTensorMode(allow_non_fake_inputs=True), RealWhenAllReal(HostReads()):
        with unset_fake_temporarily():
            counts = torch.tensor([3, 1, 2])
        total = counts.sum()
        weights = torch.empty(6, 4)
        parts = torch.split(weights, counts.tolist())
    assert not isinstance(total, FakeTensor) and int(total) == 6
    assert isinstance(weights, FakeTensor)
    assert [p.shape[0] for p in parts] == [3, 1, 2]


def test_host_read_of_a_fake_value_fails_outside_the_optimizer_step():
    reads = HostReads()
    with FakeTensorMode(), RealWhenAllReal(reads):
        x = torch.ones(3)
        with pytest.raises(HostReadError):
            x.sum().item()
        reads.allowed = True  # the optimizer step: grad norm and found-inf decide no shape
        assert x.sum().item() == 1.0 and x.any().item() is False
    assert reads.answered == 2


def test_permute_allocates_what_megatron_would():
    with FakeTensorMode():
        tokens, probs = torch.empty(10, 4), torch.empty(10, 6, requires_grad=True)
        permuted, permuted_probs, index = fake_env._permute(tokens, None, probs, num_out_tokens=17)
    assert permuted.shape == (17, 4) and permuted_probs.shape == (17,) and index.shape == (17,)
    assert permuted_probs.requires_grad


def test_fused_attention_keeps_shapes_and_no_score_matrix():
    s, b, heads, groups, d = 64, 2, 4, 2, 8
    q = torch.randn(s, b, heads, d)
    k, v = torch.randn(s, b, groups, d), torch.randn(s, b, groups, d)
    out = fake_env._fused_core_attention(None, q, k, v, None)
    assert out.shape == (s, b, heads * d)
    # causal: the first position attends to itself only
    expected = v[0].repeat_interleave(2, dim=1).reshape(b, -1)
    torch.testing.assert_close(out[0], expected)


def test_patches_are_undone():
    from megatron.core import parallel_state
    from megatron.core.transformer.moe import token_dispatcher

    before = (parallel_state.create_group, token_dispatcher.permute, dist.all_gather_object,
              torch.utils.swap_tensors)
    with fake_env.simulation_patches(DispatchLoad(RoutingLoad()), fused_attention=True):
        assert token_dispatcher.permute is fake_env._permute
    after = (parallel_state.create_group, token_dispatcher.permute, dist.all_gather_object,
             torch.utils.swap_tensors)
    assert before == after


def test_fake_parameters_convert_dtype():
    with fake_env.simulation_patches(DispatchLoad(RoutingLoad()), fused_attention=False):
        with FakeTensorMode():
            layer = torch.nn.Linear(4, 4)
            layer.bfloat16()
    assert layer.weight.dtype == torch.bfloat16
