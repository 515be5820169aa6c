"""The pruning engine: removing hidden channels of inverted-residual blocks with torch-pruning, and counting MACs.

A block's hidden channels are the expand conv's output channels. torch-pruning's dependency graph couples
them, as ONE group, to the expand BN, the depthwise conv (in, out and groups), the depthwise BN, the SE
``fc1`` inputs, the SE ``fc2`` outputs (and bias) and the project conv's inputs, and to nothing else: the
project conv's outputs and the residual path are untouched. So the channels of one block never shift when
another block is pruned, and one graph built before pruning serves every block. ``block_group`` checks that
membership on every group and refuses anything else. A block without an expand conv (the first block of
both Large and Small) cannot be pruned: its depthwise channels are the stem's output channels, which the
residual path (Large) or the stem itself (Small) share.

MACs follow torch-pruning's ``count_ops_and_params`` convention: conv and linear multiply-accumulates plus
one per bias add, BatchNorm 2 per element, ReLU/ReLU6 1 per element, pooling 1 per input element;
Hardswish, Hardsigmoid, the SE multiply and the residual add are not counted. ``block_macs`` uses the
same counter, so the blocks' values plus the stem, last conv and classifier add up to ``count_macs_params``.
"""

import copy
from numbers import Integral

import torch
import torch_pruning as tp

from .blocks import prunable
from .errors import PruneError
from .plan import min_kept

# role -> whether torch-pruning prunes its output ("out") or input ("in") channels in a block's group
GROUP_ROLES = {
    "expand": "out",
    "expand_bn": "out",
    "depthwise": "out",
    "depthwise_bn": "out",
    "se_fc1": "in",
    "se_fc2": "out",
    "project": "in",
}


def _example_input(model, image_size, random=False):
    """A (1, 3, S, S) input on the model's device and dtype; seeded when random."""
    param = next(model.parameters())
    if not random:
        return torch.zeros(1, 3, image_size, image_size, device=param.device, dtype=param.dtype)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, image_size, image_size, generator=gen)
    return x.to(device=param.device, dtype=param.dtype)


def build_graph(model, image_size=64):
    """torch-pruning's DependencyGraph of ``model``, traced on a seeded random input; every module's mode is kept."""
    modes = {m: m.training for m in model.modules()}  # tracing switches the model to eval mode
    try:
        with torch.enable_grad():
            return tp.DependencyGraph().build_dependency(
                model, example_inputs=_example_input(model, image_size, random=True), verbose=False
            )
    finally:
        for m, training in modes.items():
            m.training = training


def _block_name(roles, name):
    return name if name is not None else f"with depthwise {roles['depthwise']}"


def _as_list(name, idxs):
    """``idxs`` (list, tuple, array or tensor) as a list, or PruneError."""
    if isinstance(idxs, torch.Tensor):
        return idxs.tolist()
    if isinstance(idxs, (str, bytes, dict)) or not hasattr(idxs, "__iter__"):
        raise PruneError(f"block {name}: channels to remove must be a list of indices, got {idxs!r}")
    return list(idxs)


def _check_index(name, i, n, seen):
    """PruneError unless ``i`` is a new integer index in 0..n-1."""
    if isinstance(i, bool) or not isinstance(i, Integral):
        raise PruneError(f"block {name}: channel index {i!r} is not an integer")
    if not 0 <= i < n:
        raise PruneError(f"block {name}: channel index {i} is out of range 0..{n - 1}")
    if int(i) in seen:
        raise PruneError(f"block {name}: channel index {i} is listed twice")


def _check_block_indices(name, roles, idxs):
    """``idxs`` as a sorted list of ints, or PruneError naming the block and the bad value."""
    idxs = _as_list(name, idxs)
    if idxs and not prunable(roles):
        raise PruneError(
            f"block {name} has no expand conv: its depthwise channels are the stem's output "
            "channels, tied to the stem and the residual path, so it cannot be pruned"
        )
    n, seen = roles["hidden_channels"], set()
    for i in idxs:
        _check_index(name, i, n, seen)
        seen.add(int(i))
    floor = min_kept(n, 0.0)
    if n - len(seen) < floor:
        raise PruneError(
            f"block {name}: removing {len(seen)} of {n} channels would leave {n - len(seen)}, under its "
            f"floor of {floor} (plan.FLOOR; later stages need it): remove at most {n - floor}"
        )
    return sorted(seen)


def validate_indices(blocks, plan):
    """Check ``plan`` {block: channel indices} against ``blocks``; return it as {block: sorted ints}."""
    if not isinstance(plan, dict):
        raise PruneError(f"pruning plan must be a dict {{block name: channel indices}}, got {type(plan).__name__}")
    unknown = [name for name in plan if name not in blocks]
    if unknown:
        raise PruneError(f"pruning plan names unknown block {unknown[0]!r}: blocks are {', '.join(blocks)}")
    return {name: _check_block_indices(name, blocks[name], idxs) for name, idxs in plan.items()}


def _check_widths(model, roles, name):
    """PruneError when the model's layers no longer have the widths ``roles`` records (stale roles)."""
    try:
        expand, dw = model.get_submodule(roles["expand"]), model.get_submodule(roles["depthwise"])
    except AttributeError:
        raise PruneError(f"block {name}: the model has no layer {roles['expand']}: roles of another model?") from None
    n = roles["hidden_channels"]
    if expand.out_channels != n or dw.out_channels != n:
        raise PruneError(
            f"block {name}: roles record {n} hidden channels but the model has {dw.out_channels}: "
            "re-run find_blocks on the current model"
        )


def _group_members(graph, model, group):
    """{(module name, "out" | "in")} of the model layers a group prunes (tracing-only ops left out)."""
    names = {id(m): n for n, m in model.named_modules()}
    return {
        (names[id(dep.target.module)], "out" if graph.is_out_channel_pruning_fn(dep.handler) else "in")
        for dep, _ in group
        if id(dep.target.module) in names
    }


def _check_members(graph, model, group, roles, name):
    """PruneError unless the group prunes exactly the block's own hidden-channel layers."""
    expected = {(roles[role], kind) for role, kind in GROUP_ROLES.items() if role in roles}
    found = _group_members(graph, model, group)
    if found != expected:
        extra = sorted(f"{n} ({k})" for n, k in found - expected)
        missing = sorted(f"{n} ({k})" for n, k in expected - found)
        raise PruneError(
            f"block {name}: torch-pruning couples unexpected layers {extra} / misses {missing}; "
            "its hidden channels are not independent of the rest of the model"
        )


def block_group(graph, model, roles, idxs, name=None):
    """The checked torch-pruning group removing ``idxs`` from one block's hidden channels (nothing pruned yet)."""
    name = _block_name(roles, name)
    idxs = _check_block_indices(name, roles, idxs)
    if not idxs:
        raise PruneError(f"block {name}: no channel indices to remove")
    _check_widths(model, roles, name)
    group = graph.get_pruning_group(model.get_submodule(roles["expand"]), tp.prune_conv_out_channels, idxs)
    if not graph.check_pruning_group(group):
        raise PruneError(f"block {name}: torch-pruning refuses to remove channels {idxs} (a layer would be emptied)")
    _check_members(graph, model, group, roles, name)
    return group


def prune_blocks(model, blocks, plan, image_size=64):
    """Remove ``plan`` {block: channel indices} in place, one group per block; {block: before, after, removed}.

    Indices are in each block's numbering before this call. Everything is checked, and every group built,
    before the first layer changes. Pruned layers get new Parameter objects: build optimizers afterwards.
    """
    plan = validate_indices(blocks, plan)
    todo = {name: idxs for name, idxs in plan.items() if idxs}
    groups = {}
    if todo:
        graph = build_graph(model, image_size)
        groups = {name: block_group(graph, model, blocks[name], todo[name], name) for name in blocks if name in todo}
    for group in groups.values():
        group.prune()
    return {
        name: {
            "before": blocks[name]["hidden_channels"],
            "after": blocks[name]["hidden_channels"] - len(idxs),
            "removed": idxs,
        }
        for name, idxs in plan.items()
    }


def count_macs_params(model, image_size):
    """(MACs, parameters) of ``model`` on one (1, 3, S, S) image, by torch-pruning's counter."""
    with torch.no_grad():
        macs, params = tp.utils.count_ops_and_params(model, _example_input(model, image_size))
    return int(macs), int(params)


def block_macs(model, blocks, image_size):
    """{block: MACs of that block on one (1, 3, S, S) image}, in ``count_macs_params``'s convention."""
    with torch.no_grad():
        _, _, layer_macs, _ = tp.utils.count_ops_and_params(model, _example_input(model, image_size), layer_wise=True)
    return {name: int(layer_macs[model.get_submodule(name)]) for name in blocks}


def macs_per_channel(model, blocks, image_size):
    """{prunable block: MACs removed with one of its hidden channels}, measured by pruning a copy.

    Every term of a block's MACs that depends on its hidden width (expand out, its BN and activation,
    depthwise, its BN and activation, SE pool, fc1 in, fc2 out and bias, project in) is linear in it, so
    removing k channels removes exactly k times this. Blocks without an expand conv, or with one hidden
    channel left, cannot lose a channel and are left out.
    """
    plan = {
        name: [roles["hidden_channels"] - 1]
        for name, roles in blocks.items()
        if prunable(roles) and roles["hidden_channels"] > 1
    }
    probe = copy.deepcopy(model)
    prune_blocks(probe, blocks, plan, image_size)
    before, after = block_macs(model, plan, image_size), block_macs(probe, plan, image_size)
    return {name: before[name] - after[name] for name in plan}
