"""Tests of mbv3prune.reconstruct: joint OBS removal and the least-squares refit of kept weights (float64).

Pure-matrix tests check the algebra (OBS against fluctuation**2 and against the refit, large ridges against
mean compensation); model tests use a randomized tiny MobileNetV3-Large (conftest) at 32 px, refit blocks
with ``apply_block_refit`` / ``sequential_refit`` and prune them with torch-pruning.
"""

import copy
import functools

import pytest
import torch

from mbv3prune import reconstruct as R
from mbv3prune.blocks import find_blocks
from mbv3prune.compensate import compensate
from mbv3prune.errors import PruneError
from mbv3prune.moments import Moments, rows_of
from mbv3prune.prune import prune_blocks
from tests.helpers import randomized_model

SIZE = 32
ARCH = "mobilenet_v3_large"


def _random_data(n=4000, c=12, seed=0):
    """Correlated rows [n, c] with distinct means (float64)."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(c, c, generator=gen, dtype=torch.float64)
    return torch.randn(n, c, generator=gen, dtype=torch.float64) @ mix + torch.arange(c, dtype=torch.float64)


def _error(w, cov, new, kept, d):
    """d-weighted centred error of replacing W x by W' x_K on data of covariance ``cov``."""
    k = torch.tensor(kept)
    full = torch.zeros_like(w)
    full[:, k] = new
    diff = w - full
    return float(((diff @ cov) * diff * d[:, None]).sum())


def test_diagonal_cov_ranks_exactly_as_fluctuation_squared():
    gen = torch.Generator().manual_seed(1)
    var = torch.rand(20, generator=gen, dtype=torch.float64) + 0.1
    w = torch.randn(7, 20, generator=gen, dtype=torch.float64)
    d = torch.rand(7, generator=gen, dtype=torch.float64) + 0.5
    fluct2 = var * (d[:, None] * w**2).sum(0)
    res = R.obs_removal(torch.diag(var), w, d, ridge=0.0)
    assert res.order == torch.argsort(fluct2).tolist()[:19]
    assert torch.allclose(res.costs, fluct2[res.order])


def test_obs_removes_a_duplicate_where_magnitude_removes_the_small_channel():
    gen = torch.Generator().manual_seed(2)
    n = 5000
    feature = torch.randn(n, generator=gen, dtype=torch.float64) + 3.0
    small = 0.1 * torch.randn(n, generator=gen, dtype=torch.float64) + 0.3
    x = torch.stack([feature, feature.clone(), small], 1)
    w = torch.tensor([[1.0, 0.5, 1.0], [0.2, 1.0, -1.0]], dtype=torch.float64)
    cov = Moments(3).add(x).cov()
    res = R.obs_removal(cov, w, torch.ones(2, dtype=torch.float64), ridge=1e-6, n_remove=1)
    magnitude = x.abs().mean(0)
    assert res.order[0] in (0, 1)
    assert int(magnitude.argmin()) == 2
    assert float(res.costs[0]) < 1e-3 * float(cov[2, 2] * (w[:, 2] ** 2).sum())  # the copy costs ~nothing


def test_obs_weights_and_costs_equal_the_joint_refit_of_the_removed_set():
    x = _random_data()
    cov = Moments(x.shape[1]).add(x).cov()
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(5, x.shape[1], generator=gen, dtype=torch.float64)
    d = torch.rand(5, generator=gen, dtype=torch.float64) + 0.5
    res = R.obs_removal(cov, w, d, ridge=0.0, n_remove=7)
    kept = R.kept_indices(x.shape[1], res.order)
    new = R.refit(w, cov, cov, kept, ridge=0.0)
    assert torch.allclose(res.weight[:, kept], new, atol=1e-9)
    assert torch.all(res.weight[:, res.order] == 0)
    assert float(res.costs.sum()) == pytest.approx(_error(w, cov, new, kept, d), rel=1e-9)
    assert res.variance == pytest.approx(float(((w @ cov) * w * d[:, None]).sum()))


def test_refit_never_does_worse_than_mean_compensation_and_large_ridge_gives_it_back():
    x = _random_data(seed=4)
    mom = Moments(x.shape[1]).add(x)
    cov = mom.cov()
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(6, x.shape[1], generator=gen, dtype=torch.float64)
    d = torch.ones(6, dtype=torch.float64)
    kept = [0, 2, 3, 5, 8, 9, 11]
    removed = [i for i in range(x.shape[1]) if i not in kept]
    mean_only = _error(w, cov, w[:, kept], kept, d)
    for ridge in (0.0, 1e-3, 1e-1, 10.0):
        assert _error(w, cov, R.refit(w, cov, cov, kept, ridge), kept, d) <= mean_only * (1 + 1e-12)
    big = R.refit(w, cov, cov, kept, ridge=1e9)
    assert torch.allclose(big, w[:, kept], atol=1e-6)
    shift = R.mean_residual(w, big, mom.mean, mom.mean, kept)
    assert torch.allclose(shift, w[:, removed] @ mom.mean[removed], atol=1e-5)


@functools.cache
def _calibrated():
    return randomized_model(ARCH, 0, SIZE).double()


def _model():
    return copy.deepcopy(_calibrated())


def _batches(seed=0, n=2, size=8):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(size, 3, SIZE, SIZE, generator=gen, dtype=torch.float64) for _ in range(n)]


def _pick(blocks, se):
    return next(n for n, r in blocks.items() if "expand" in r and r["has_se"] == se)


def _duplicate_channels(model, roles, pairs):
    """Make hidden channel r an exact copy of channel k for every (r, k): expand row, BNs, depthwise filter
    and SE fc2 row copied, so its pre-gate input, gate and project input equal channel k's everywhere."""
    with torch.no_grad():
        for r, k in pairs:
            for role in ("expand", "depthwise"):
                model.get_submodule(roles[role]).weight[r] = model.get_submodule(roles[role]).weight[k]
            for role in ("expand_bn", "depthwise_bn"):
                bn = model.get_submodule(roles[role])
                for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var):
                    t[r] = t[k]
            if roles.get("se_fc2"):
                fc2 = model.get_submodule(roles["se_fc2"])
                fc2.weight[r], fc2.bias[r] = fc2.weight[k], fc2.bias[k]


def _fit_stats(model, blocks, batches):
    """The project_input capture (means for compensate) of ``model`` on ``batches``."""
    from mbv3prune.capture import capture

    stats, _ = capture(
        model, [(b, torch.zeros(len(b), dtype=torch.int64)) for b in batches], blocks, "project_input", progress=False
    )
    return stats


def _oneshot(model, roles, block, batches):
    proj = R.block_fit_moments(model, model, batches, block, roles, "project")
    se = R.block_fit_moments(model, model, batches, block, roles, "se") if roles.get("se_fc1") else None
    return R.BlockMoments(proj, se)


def test_block_errors_name_a_block_the_pruned_model_never_ran():
    base = _model()
    block = list(find_blocks(base))[-1]
    shortcut = copy.deepcopy(base)
    shortcut.forward = lambda x: shortcut.features[:2](x)  # the later blocks are there but never run
    with pytest.raises(PruneError, match=f"block {block} never ran"):
        R.block_errors(base, shortcut, _batches(), [block])


@pytest.mark.parametrize("se", [False, True])
def test_removing_exact_copies_with_ridge_zero_leaves_the_block_output_unchanged(se):
    base = _model()
    blocks = find_blocks(base)
    block = _pick(blocks, se)
    pairs = [(1, 0), (4, 2), (6, 3)]
    _duplicate_channels(base, blocks[block], pairs)
    removed = [r for r, _ in pairs]
    batches = _batches()
    refit, mean_only = copy.deepcopy(base), copy.deepcopy(base)
    R.apply_block_refit(refit, blocks[block], removed, _oneshot(base, blocks[block], block, batches), ridge=0.0)
    compensate(mean_only, blocks, {block: removed}, _fit_stats(base, blocks, batches))
    for m in (refit, mean_only):
        prune_blocks(m, blocks, {block: removed}, SIZE)
    exact = R.block_errors(base, refit, batches, [block])[block]
    mean_err = R.block_errors(base, mean_only, batches, [block])[block]
    assert exact < 1e-10  # relative squared error: the output is unchanged to ~1e-5 of its std
    assert mean_err > 1e-4


@pytest.mark.parametrize("se", [False, True])
def test_refit_and_prune_shrinks_the_block_error_against_mean_compensation(se):
    base = _model()
    blocks = find_blocks(base)
    block = _pick(blocks, se)
    batches = _batches(seed=5)
    stats = _fit_stats(base, blocks, batches)
    mean_abs = stats[f"{blocks[block]['project']}/sum_abs"] / stats[f"{blocks[block]['project']}/n"]
    removed = torch.argsort(mean_abs)[: blocks[block]["hidden_channels"] // 3].tolist()
    refit, mean_only = copy.deepcopy(base), copy.deepcopy(base)
    R.apply_block_refit(refit, blocks[block], removed, _oneshot(base, blocks[block], block, batches), ridge=1e-3)
    compensate(mean_only, blocks, {block: removed}, stats)
    for m in (refit, mean_only):
        prune_blocks(m, blocks, {block: removed}, SIZE)
    assert refit.get_submodule(blocks[block]["project"]).in_channels == blocks[block]["hidden_channels"] - len(removed)
    assert (
        R.block_errors(base, refit, batches, [block])[block]
        < 0.9 * R.block_errors(base, mean_only, batches, [block])[block]
    )


def _selection(base, blocks, names, batches):
    stats = _fit_stats(base, blocks, batches)
    out = {}
    for b in names:
        layer = blocks[b]["project"]
        out[b] = torch.argsort(stats[f"{layer}/sum_abs"])[: blocks[b]["hidden_channels"] // 3].tolist()
    return out, stats


def test_sequential_refit_beats_mean_compensation_on_every_pruned_block():
    base = _model()
    blocks = find_blocks(base)
    names = [n for n in blocks if "expand" in blocks[n]][:5]
    batches = _batches(seed=6)
    selection, stats = _selection(base, blocks, names, batches)
    pruned, report = R.sequential_refit(base, lambda: batches, selection, ridge=1e-3, image_size=SIZE)
    mean_only = copy.deepcopy(base)
    compensate(mean_only, blocks, selection, stats)
    prune_blocks(mean_only, blocks, selection, SIZE)
    mean_err = R.block_errors(base, mean_only, batches, names)
    assert R.block_errors(base, pruned, batches, list(blocks)) == pytest.approx(
        {b: report[b]["fit_error"] for b in blocks}
    )
    for b in names:
        assert report[b]["removed"] == len(selection[b])
        assert report[b]["fit_error"] < mean_err[b]


def test_residual_target_lowers_a_residual_blocks_error_on_the_fit_data():
    base = _model()
    blocks = find_blocks(base)
    prunable = [n for n in blocks if "expand" in blocks[n]]
    res_block = next(n for n in prunable[1:] if blocks[n]["has_residual"])
    names = prunable[: prunable.index(res_block) + 1]
    batches = _batches(seed=7)
    selection, _ = _selection(base, blocks, names, batches)
    errors = {}
    for residual in (False, True):
        _, report = R.sequential_refit(
            base, lambda: batches, selection, ridge=0.0, residual_target=residual, image_size=SIZE
        )
        errors[residual] = report[res_block]["fit_error"]
    assert errors[True] < errors[False]


def test_block_fit_moments_of_one_model_are_its_own_moments():
    base = _model()
    blocks = find_blocks(base)
    block = _pick(blocks, True)
    roles = blocks[block]
    batches = _batches(seed=8, n=1)
    got = {}
    handle = base.get_submodule(roles["project"]).register_forward_pre_hook(lambda m, a: got.setdefault("x", a[0]))
    with torch.no_grad():
        base(batches[0])
    handle.remove()
    rows = rows_of(got["x"])
    fit = R.block_fit_moments(base, base, batches, block, roles, "project")
    assert torch.allclose(fit.cov_yy, torch.cov(rows.T, correction=0), atol=1e-10)
    assert torch.allclose(fit.cov_xy, fit.cov_yy) and torch.allclose(fit.mean_x, rows.mean(0))


def test_obs_on_a_singular_covariance_needs_a_ridge():
    from mbv3prune.errors import PruneError

    cov = torch.tensor([[1.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    w, d = torch.ones(1, 2, dtype=torch.float64), torch.ones(1, dtype=torch.float64)
    with pytest.raises(PruneError, match="singular.*RIDGE"):
        R.obs_removal(cov, w, d, ridge=0.0)
    assert len(R.obs_removal(cov, w, d, ridge=1e-6).order) == 1
