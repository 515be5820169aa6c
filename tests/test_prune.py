"""Tests of mbv3prune.prune on Large and Small: exact indices, dead channels, errors, checkpoints and MACs.

Biases, BN affine terms and BN statistics are made to differ per channel first, so a wrong index shows in
every member layer.
"""

import copy

import pytest
import torch

from mbv3prune import models
from mbv3prune.blocks import find_blocks
from mbv3prune.errors import PruneError
from mbv3prune.prune import (
    block_group,
    block_macs,
    build_graph,
    count_macs_params,
    macs_per_channel,
    prune_blocks,
    validate_indices,
)
from tests.helpers import randomized_model

ARCHS = models.ARCHS
SIZE = 32
# role -> dimension of its weight (and bias / BN buffers) that holds the block's hidden channels
HIDDEN_DIM = {"expand": 0, "expand_bn": 0, "depthwise": 0, "depthwise_bn": 0, "se_fc1": 1, "se_fc2": 0, "project": 1}


def _model(arch, seed=0):
    """See conftest.randomized_model."""
    return randomized_model(arch, seed, SIZE)


def _batch(n=2, size=SIZE):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


def _prunable(blocks):
    return [name for name, roles in blocks.items() if "expand" in roles]


def _random_plan(blocks, names, k, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {name: torch.randperm(blocks[name]["hidden_channels"], generator=gen)[:k].tolist() for name in names}


def _three_blocks(blocks):
    """A block with SE, one without, and the last block."""
    names = _prunable(blocks)
    return [next(n for n in names if blocks[n]["has_se"]), next(n for n in names if not blocks[n]["has_se"]), names[-1]]


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, models.layer_widths(model), model.training


def _same(a, b):
    return a[1:] == b[1:] and a[0].keys() == b[0].keys() and all(torch.equal(a[0][k], b[0][k]) for k in a[0])


def _tensors(module):
    return {k: v for k, v in module.state_dict().items() if v.dim() > 0}


@pytest.mark.parametrize("arch", ARCHS)
def test_one_group_is_exactly_the_blocks_hidden_layers(arch):
    """Each expand-rooted group prunes the block's own layers only: no project output, no residual path."""
    model = _model(arch)
    blocks = find_blocks(model)
    graph = build_graph(model, SIZE)
    names = {id(m): n for n, m in model.named_modules()}
    for name in _prunable(blocks):
        roles = blocks[name]
        group = block_group(graph, model, roles, [0, 2], name)
        members = {
            (names[id(dep.target.module)], dep.handler.__name__) for dep, _ in group if id(dep.target.module) in names
        }
        assert members == {
            (roles[r], "prune_in_channels" if dim else "prune_out_channels")
            for r, dim in HIDDEN_DIM.items()
            if r in roles
        }
        assert all(m.startswith(name + ".") for m, _ in members)


@pytest.mark.parametrize("arch", ARCHS)
def test_removes_exactly_the_planned_indices(arch):
    model = _model(arch)
    original = copy.deepcopy(model)
    blocks = find_blocks(model)
    plan = _random_plan(blocks, _three_blocks(blocks), k=5)
    record = prune_blocks(model, blocks, plan, SIZE)
    for name, idxs in plan.items():
        roles, n = blocks[name], blocks[name]["hidden_channels"]
        assert record[name] == {"before": n, "after": n - 5, "removed": sorted(idxs)}
        keep = torch.tensor([i for i in range(n) if i not in idxs])
        for role, dim in HIDDEN_DIM.items():
            if role not in roles:
                continue
            pruned, before = _tensors(model.get_submodule(roles[role])), _tensors(original.get_submodule(roles[role]))
            for key, t in before.items():
                d = dim if t.dim() > 1 else 0
                expected = t if (t.dim() == 1 and dim == 1) else t.index_select(d, keep)
                assert torch.equal(pruned[key], expected), f"{roles[role]}.{key}"
    touched = {blocks[name][r] for name in plan for r in HIDDEN_DIM if r in blocks[name]}
    after = model.state_dict()
    for key, t in original.state_dict().items():
        if key.rpartition(".")[0] not in touched:
            assert torch.equal(after[key], t), key
    assert model(_batch()).shape == (2, 3)


@pytest.mark.parametrize("arch", ARCHS)
def test_one_graph_equals_a_fresh_graph_per_block(arch):
    """Pruning several blocks with one graph gives what pruning them one by one, each on a new graph, gives."""
    together, alone = _model(arch), _model(arch)
    blocks = find_blocks(together)
    plan = _random_plan(blocks, _prunable(blocks), k=3, seed=2)
    prune_blocks(together, blocks, plan, SIZE)
    for name, idxs in plan.items():
        prune_blocks(alone, find_blocks(alone), {name: idxs}, SIZE)
    a, b = together.state_dict(), alone.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _dead_block(blocks, with_se):
    """A prunable block with (or without) SE, with ReLU when there is one (Small's SE blocks use Hardswish,
    which is also exactly 0 below -3)."""
    names = [n for n in _prunable(blocks) if blocks[n]["has_se"] == with_se]
    return next((n for n in names if blocks[n]["activation"] == "ReLU"), names[0])


def _outputs(model, roles, x):
    """(model output, depthwise activation, SE fc1 output or None) on ``x``."""
    seen = {}
    hooks = [
        model.get_submodule(roles[r]).register_forward_hook(
            lambda m, i, o, r=r: seen.__setitem__(r, o.detach().clone())
        )
        for r in ("depthwise_act", "se_fc1")
        if r in roles
    ]
    with torch.no_grad():
        out = model(x)
    for h in hooks:
        h.remove()
    return out, seen["depthwise_act"], seen.get("se_fc1")


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("with_se", [True, False])
def test_removing_dead_channels_leaves_the_output_unchanged(arch, with_se):
    """In float64, so that summing fewer (zero) terms cannot move the output by float32 rounding."""
    model = _model(arch).double()
    blocks = find_blocks(model)
    name = _dead_block(blocks, with_se)
    roles, dead = blocks[name], [1, 4, 6]
    bn = model.get_submodule(roles["depthwise_bn"])
    with torch.no_grad():
        bn.weight[dead], bn.bias[dead] = 0.0, -100.0
    x = _batch().double()
    out, act, fc1 = _outputs(model, roles, x)
    assert torch.all(act[:, dead] == 0) and torch.any(act != 0)
    live = copy.deepcopy(model)
    prune_blocks(model, blocks, {name: dead}, SIZE)
    out_after, _, fc1_after = _outputs(model, find_blocks(model)[name], x)
    assert (out_after - out).abs().max() <= 1e-5
    if with_se:
        assert (fc1_after - fc1).abs().max() <= 1e-5
    prune_blocks(live, blocks, {name: [0, 2, 3]}, SIZE)  # control: live channels do change the output
    assert (_outputs(live, find_blocks(live)[name], x)[0] - out).abs().max() > 1e-4


def _bad_plans(blocks):
    """(plan, what the error must name, the bad value as the error shows it) for each kind of bad input."""
    b = _prunable(blocks)[1]
    n = blocks[b]["hidden_channels"]
    first = next(iter(blocks))
    return [
        ({first: [0]}, first, "no expand conv"),
        ({b: [0, n]}, b, f"index {n} "),
        ({b: [3, 1, 3]}, b, "index 3 "),
        ({b: [2, -1]}, b, "index -1 "),
        ({b: [1.5]}, b, "1.5"),
        ({b: list(range(n))}, b, f"{n} of {n}"),
        ({"features.99": [0]}, "features.99", "unknown"),
        ([0, 1], "dict", "list"),
    ]


@pytest.mark.parametrize("arch", ARCHS)
def test_bad_plans_raise_and_leave_the_model_unchanged(arch):
    model = _model(arch).train()
    blocks = find_blocks(model)
    good = _prunable(blocks)[0]
    before = _snapshot(model)
    for plan, where, what in _bad_plans(blocks):
        with pytest.raises(PruneError) as err:
            prune_blocks(model, blocks, {good: [0], **plan} if isinstance(plan, dict) else plan, SIZE)
        assert where in str(err.value) and what in str(err.value)
        with pytest.raises(PruneError):
            validate_indices(blocks, plan)
        assert _same(_snapshot(model), before)


def test_block_without_expand_is_refused_by_block_group():
    model = _model("mobilenet_v3_large")
    roles = find_blocks(model)["features.1"]
    with pytest.raises(PruneError, match="no expand conv"):
        block_group(build_graph(model, SIZE), model, roles, [0], "features.1")


def test_stale_roles_are_refused_before_anything_is_pruned():
    """A plan whose second block's roles no longer match the model fails, and its first block is not pruned."""
    model = _model("mobilenet_v3_small").train()
    blocks = find_blocks(model)
    first, second = _prunable(blocks)[:2]
    prune_blocks(model, blocks, {second: [0]}, SIZE)
    before = _snapshot(model)
    with pytest.raises(PruneError, match=f"block {second}.*find_blocks"):
        prune_blocks(model, blocks, {first: [0], second: [1]}, SIZE)
    assert _same(_snapshot(model), before)


def test_validate_indices_normalises_good_plans():
    blocks = find_blocks(_model("mobilenet_v3_small"))
    a, b = _prunable(blocks)[:2]
    plan = {a: torch.tensor([5, 2]), b: (7, 0, 3), next(iter(blocks)): []}
    assert validate_indices(blocks, plan) == {a: [2, 5], b: [0, 3, 7], next(iter(blocks)): []}


def test_build_graph_keeps_every_modules_mode_and_statistics():
    """Tracing puts the model in eval mode; build_graph gives each module its own mode back."""
    model = _model("mobilenet_v3_small").train()
    frozen = model.get_submodule(find_blocks(model)["features.2"]["expand_bn"]).eval()
    before = _snapshot(model)
    build_graph(model, SIZE)
    assert _same(_snapshot(model), before) and model.training and not frozen.training


@pytest.mark.parametrize("arch", ARCHS)
def test_pruned_model_widths_forward_and_checkpoint(tmp_path, arch):
    model = _model(arch)
    blocks = find_blocks(model)
    plan = _random_plan(blocks, _three_blocks(blocks), k=4, seed=3)
    record = prune_blocks(model, blocks, plan, SIZE)
    widths, found = models.layer_widths(model), find_blocks(model)
    for name in plan:
        roles, m = blocks[name], record[name]["after"]
        assert found[name]["hidden_channels"] == m and widths[roles["expand"]]["out"] == m
        assert widths[roles["depthwise"]] == {"in": m, "out": m, "groups": m}
        assert widths[roles["project"]] == {"in": m, "out": roles["out_channels"], "groups": 1}
        if roles["has_se"]:
            assert widths[roles["se_fc1"]]["in"] == m and widths[roles["se_fc2"]]["out"] == m
    x = _batch(3)
    with torch.no_grad():
        out = model(x)
    models.save_checkpoint(tmp_path / "p.pt", model, arch, ["a", "b", "c"])
    loaded, _ = models.load_checkpoint(str(tmp_path / "p.pt"))
    with torch.no_grad():
        assert out.shape == (3, 3) and torch.equal(loaded(x), out)


@pytest.mark.parametrize("arch", ARCHS)
def test_macs_per_channel_predicts_the_counted_drop(arch):
    model = _model(arch)
    blocks = find_blocks(model)
    per_channel = macs_per_channel(model, blocks, SIZE)
    assert set(per_channel) == set(_prunable(blocks)) and all(v > 0 for v in per_channel.values())
    macs0, params0 = count_macs_params(model, SIZE)
    blocks0 = block_macs(model, blocks, SIZE)
    plan = _random_plan(blocks, _three_blocks(blocks), k=7, seed=4)
    prune_blocks(model, blocks, plan, SIZE)
    macs1, params1 = count_macs_params(model, SIZE)
    blocks1 = block_macs(model, blocks, SIZE)
    assert macs0 - macs1 == sum(7 * per_channel[n] for n in plan) and params1 < params0
    for name in blocks:
        assert blocks0[name] - blocks1[name] == (7 * per_channel[name] if name in plan else 0)
    assert macs0 - sum(blocks0.values()) == macs1 - sum(blocks1.values()) > 0
