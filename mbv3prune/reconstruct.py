"""Reconstruction: choose a block's channels jointly (optimal brain surgeon) and refit the kept weights.

A hidden channel of a MobileNetV3 block feeds two linear layers: the project 1x1 conv (then its BN) and,
through the pooled pre-gate depthwise activation, SE fc1. For a removed set R (kept set K) the kept
columns that best preserve a layer's output have a closed form in the second moments of its inputs. With
x the inputs the target was computed on (the original model's), y the inputs the refit layer will see
(the same model's for ``oneshot``, the partially pruned model's for ``sequential``), S = Cov(x, y),
C~ = Cov(y) and mu, mu~ their means:

    W' = (W S[:, K] + lambda W_K)(C~[K, K] + lambda I)^-1,    lambda = ridge * mean(diag C~[K, K]),

the least-squares fit of W x by W' y_K with a ridge pulling W' toward the kept weights W_K. The mean
residual W mu - W' mu~_K goes into the project BN's running_mean (subtracted, as in ``compensate``) and,
for SE fc1, into fc1.bias (added). ``ridge -> inf`` gives W' = W_K and the residual W_R mu_R: today's mean
compensation. The removed columns are then zeroed, so the UNPRUNED model already computes what the pruned
one will, and ``prune.prune_blocks`` removing R afterwards changes nothing more.

SE with few images: the pooled input has one row per image, so C~ has rank <= images - 1. With ridge 0
the solve is then singular (a pseudo-inverse is used: the minimum-norm fit, exact on the images seen and
arbitrary elsewhere); a ridge > 0 keeps it well posed, and with far fewer images than channels the fit
stays close to W_K (mean compensation) in every direction the images do not span.

The block-output units: the project BN scales output o by s_o = gamma_o / sqrt(running_var_o + eps), so an
error in the project conv output z costs sum_o d_o dz_o**2 with d_o = s_o**2 (``output_weights``).
Everything is computed in float64 on the CPU (the matrices are at most a few thousand wide) and written
back in each layer's dtype and device.
"""

import contextlib
import copy
from collections import namedtuple

import torch
from torchvision.models.mobilenetv3 import InvertedResidual

from .blocks import find_blocks
from .errors import PruneError
from .moments import Moments, rows_of
from .prune import prune_blocks, validate_indices

# result of obs_removal: removal order, incremental costs, d-weighted output variance, final weights
ObsResult = namedtuple("ObsResult", "order costs variance weight")
# moments one refit needs: targets' inputs x and fitted inputs y (CPU float64); cov_xy [dx, C], cov_yy [C, C]
FitMoments = namedtuple("FitMoments", "mean_x mean_y cov_xy cov_yy")
# a block's refit moments: the project conv input (over positions) and the SE fc1 input (None without SE)
BlockMoments = namedtuple("BlockMoments", "project se")


def _f64(t):
    return torch.as_tensor(t).detach().to("cpu", torch.float64)


def output_weights(bn):
    """d_o = gamma_o**2 / (running_var_o + eps) of a BatchNorm (CPU float64): project output in block units."""
    gamma = _f64(bn.weight) if bn.weight is not None else torch.ones(bn.num_features, dtype=torch.float64)
    return gamma**2 / (_f64(bn.running_var) + bn.eps)


def _ridge_lambda(cov, ridge):
    """ridge * mean diagonal of ``cov`` (0 for an empty or all-zero matrix)."""
    if ridge < 0:
        raise PruneError(f"RIDGE={ridge} must be >= 0")
    return float(ridge) * float(cov.diagonal().mean()) if cov.numel() else 0.0


def _solve_right(b, a, regularized):
    """b @ a^-1 for symmetric PSD ``a``: Cholesky when ridged (and positive definite), else the pseudo-inverse
    (the minimum-norm least-squares fit, exact on the data when the target lies in the inputs' span)."""
    if regularized:
        chol, info = torch.linalg.cholesky_ex(a)
        if int(info) == 0:
            return torch.cholesky_solve(b.T, chol).T
    return b @ torch.linalg.pinv(a, hermitian=True)


def _weighted_variance(cov, weight, d):
    """trace(diag(d) W cov W^T): the d-weighted variance of W x."""
    return float(((weight @ cov) * weight * d[:, None]).sum())


def obs_removal(cov, weight, d, ridge=0.0, removable=None, n_remove=None):
    """Greedy joint optimal-brain-surgeon removal of one block's hidden channels; returns an ``ObsResult``.

    cov: centred covariance [C, C] of the project conv input; weight: project conv W [out, C]; d [out]:
    ``output_weights`` of the project BN. H = cov + lambda I, lambda = ridge * mean diag(cov). Step by
    step it removes the removable channel c of least cost dE_c = sum_o d_o W[o, c]**2 / [H^-1]_cc (the
    others refit), then downdates H^-1 -= H^-1[:, c] H^-1[c, :] / H^-1[c, c] and W -= W[:, c] H^-1[c, :] /
    H^-1[c, c], so later costs see the updated W and H^-1. ``removable`` (bool [C], default all) limits the
    candidates; ``n_remove`` (default: all removable but one channel of the block kept) the steps. A
    singular cov (dead or duplicate channels) needs ridge > 0 (PruneError otherwise).

    Returns ``order`` (channel indices in removal order), ``costs`` (float64 [steps], each step's
    increase of the d-weighted error in the H metric: with ridge 0 exactly the increase in output error
    on the data of ``cov``; with ridge > 0 it also counts lambda * the d-weighted squared weight change),
    ``variance`` (trace(diag(d) W cov W^T), the block output's d-weighted variance: cumsum(costs) /
    variance is the relative error) and ``weight`` (W after the removals: the refit, removed columns 0).
    With a diagonal cov and ridge 0 the order is that of var(a_c) * sum_o d_o W[o, c]**2 (fluctuation**2).
    """
    cov, w, d = _f64(cov), _f64(weight).clone(), _f64(d)
    c = cov.shape[0]
    if cov.shape != (c, c) or w.shape[1] != c or d.shape != (w.shape[0],):
        raise PruneError(
            f"obs_removal: cov {tuple(cov.shape)}, weight {tuple(w.shape)} and d {tuple(d.shape)} "
            "do not fit (cov [C, C], weight [out, C], d [out])"
        )
    variance = _weighted_variance(cov, w, d)
    h_inv, info = torch.linalg.inv_ex(cov + _ridge_lambda(cov, ridge) * torch.eye(c, dtype=torch.float64))
    if int(info) != 0 or not bool(torch.isfinite(h_inv).all()):
        raise PruneError(
            f"obs_removal: the covariance of {c} channels is singular (dead or duplicate channels): use RIDGE > 0"
        )
    free = (
        torch.ones(c, dtype=torch.bool) if removable is None else torch.as_tensor(removable, dtype=torch.bool).clone()
    )
    steps = min(int(free.sum()), c - 1) if n_remove is None else int(n_remove)
    if steps > min(int(free.sum()), c - 1):
        raise PruneError(f"obs_removal: cannot remove {steps} of {c} channels ({int(free.sum())} removable, one kept)")
    order, costs = [], []
    for _ in range(steps):
        diag = h_inv.diagonal()
        cost = (d[:, None] * w**2).sum(0) / diag.clamp(min=torch.finfo(torch.float64).tiny)
        j = int(torch.where(free, cost, torch.inf).argmin())
        row = h_inv[j] / h_inv[j, j]
        w -= w[:, j : j + 1] * row
        h_inv -= h_inv[:, j : j + 1] * row
        w[:, j], h_inv[j], h_inv[:, j] = 0.0, 0.0, 0.0
        free[j] = False
        order.append(j)
        costs.append(float(cost[j]))
    return ObsResult(order, torch.tensor(costs, dtype=torch.float64), variance, w)


def kept_indices(channels, removed):
    """The sorted complement of ``removed`` in range(channels)."""
    gone = set(int(i) for i in removed)
    return [i for i in range(channels) if i not in gone]


def refit(weight, cov_xy, cov_yy, kept, ridge=0.0):
    """Refit kept columns: W' = (W S[:, K] + lambda W_K)(C~[K, K] + lambda I)^-1 (CPU float64 [out, |K|]).

    weight: W [out, dx], the target is W x; cov_xy: S = Cov(x, y) [dx, C]; cov_yy: C~ = Cov(y) [C, C];
    kept: the indices K of y kept; lambda = ridge * mean diag(C~[K, K]). W_K is W[:, K] (so dx >= C and the
    first C rows of x correspond to y's channels: extra rows, e.g. a residual target, have no kept weight).
    Oneshot: S = C~ = the original model's covariance. ridge -> inf gives W_K.
    """
    w, s, cyy = _f64(weight), _f64(cov_xy), _f64(cov_yy)
    k = torch.as_tensor(list(kept), dtype=torch.long)
    if s.shape != (w.shape[1], cyy.shape[0]) or cyy.shape[0] != cyy.shape[1] or w.shape[1] < cyy.shape[0]:
        raise PruneError(
            f"refit: weight {tuple(w.shape)}, cov_xy {tuple(s.shape)} and cov_yy {tuple(cyy.shape)} "
            "do not fit (weight [out, dx], cov_xy [dx, C], cov_yy [C, C], dx >= C)"
        )
    a = cyy[k][:, k]
    lam = _ridge_lambda(a, ridge)
    b = w @ s[:, k] + lam * w[:, k]
    return _solve_right(b, a + lam * torch.eye(len(k), dtype=torch.float64), lam > 0)


def mean_residual(weight, new_weight, mean_x, mean_y, kept):
    """W mu - W' mu~_K (CPU float64 [out]): what the refit layer's output mean lacks, to fold into BN / bias."""
    k = torch.as_tensor(list(kept), dtype=torch.long)
    return _f64(weight) @ _f64(mean_x) - _f64(new_weight) @ _f64(mean_y)[k]


def oneshot_moments(stats, block, roles):
    """``BlockMoments`` of a block from a ``second_moments=True`` capture of the original model (S = C~)."""
    from .activation_stats import ActivationStats

    stats = ActivationStats.of(stats)

    _, mean, cov = stats.block_moments(block, "project")
    project = FitMoments(mean, mean, cov, cov)
    se = None
    if roles.get("se_fc1") is not None:
        _, pmean, pcov = stats.block_moments(block, "se")
        se = FitMoments(pmean, pmean, pcov, pcov)
    return BlockMoments(project, se)


def _write_columns(conv, kept, removed, new_weight):
    """conv.weight[:, K] = W', conv.weight[:, R] = 0 (1x1 conv), in the conv's dtype and device."""
    with torch.no_grad():
        wt = conv.weight
        wt[:, kept, 0, 0] = new_weight.to(wt.device, wt.dtype)
        wt[:, removed, 0, 0] = 0.0


def _target_weight(w, bn, dx):
    """The target matrix on x: W itself, or [W, diag(1 / s)] when x also holds the block-input difference."""
    c = w.shape[1]
    if dx == c:
        return w
    if dx != c + w.shape[0]:
        raise PruneError(f"project conv of {c} inputs: moments have {dx} target rows, expected {c} or {c + w.shape[0]}")
    s = output_weights(bn).sqrt()
    inv = torch.where(s > 0, 1.0 / s.clamp(min=torch.finfo(torch.float64).tiny), torch.zeros_like(s))
    return torch.cat([w, torch.diag(inv)], 1)


def _refit_layer(conv, fit, kept, removed, ridge, target_bn=None):
    """Refit one 1x1 conv's kept columns toward its target; returns the mean residual (CPU float64 [out])."""
    w = _f64(conv.weight[:, :, 0, 0])
    target = _target_weight(w, target_bn, fit.cov_xy.shape[0]) if target_bn is not None else w
    new = refit(target, fit.cov_xy, fit.cov_yy, kept, ridge)
    shift = mean_residual(target, new, fit.mean_x, fit.mean_y, kept)
    _write_columns(conv, kept, removed, new)
    return shift


def _checked_layers(model, roles, moments):
    """(project, project BN, fc1 or None), checked to be unpruned 1x1 convs that fit the moments."""
    c = roles["hidden_channels"]
    conv, bn = model.get_submodule(roles["project"]), model.get_submodule(roles["project_bn"])
    fc1 = model.get_submodule(roles["se_fc1"]) if roles.get("se_fc1") and moments.se is not None else None
    for layer, name, fit in ((conv, roles["project"], moments.project), (fc1, roles.get("se_fc1"), moments.se)):
        if layer is None or fit is None:
            continue
        if tuple(layer.kernel_size) != (1, 1) or layer.groups != 1 or layer.in_channels != c:
            raise PruneError(
                f"layer {name}: not an unpruned 1x1 conv of {c} inputs: "
                "refit before pruning, with roles from find_blocks on this model"
            )
        if tuple(fit.cov_yy.shape) != (c, c):
            raise PruneError(f"layer {name}: moments of {fit.cov_yy.shape[0]} channels, the block has {c}")
    if fc1 is not None and fc1.bias is None:
        raise PruneError(f"layer {roles['se_fc1']} has no bias: nothing to fold the SE mean residual into")
    return conv, bn, fc1


def apply_block_refit(model, roles, removed, moments, ridge=0.0, project=True, se=True):
    """Refit one block's project conv (and SE fc1) for removing ``removed``; call BEFORE ``prune.prune_blocks``.

    ``moments``: ``BlockMoments`` (``oneshot_moments`` or the sequential driver's). The project conv's kept
    columns become W', its removed columns 0 and ``running_mean -= W mu - W' mu~_K``; SE fc1 likewise with
    ``bias += V p - V' p~_K``. With project moments of C + out target rows (a residual target), the target
    is W x + delta / s. ``project`` / ``se`` = False leave that layer alone. Returns {"removed",
    "mean_shift", "gate_shift"}: the count and the largest |running_mean| and |fc1 bias| change (None: not done).
    """
    name = roles["project"]
    removed = validate_indices({name: roles}, {name: removed})[name]
    kept = kept_indices(roles["hidden_channels"], removed)
    conv, bn, fc1 = _checked_layers(model, roles, moments)
    out = {"removed": len(removed), "mean_shift": None, "gate_shift": None}
    if not removed:
        return out
    if project and moments.project is not None:
        shift = _refit_layer(conv, moments.project, kept, removed, ridge, target_bn=bn)
        with torch.no_grad():
            bn.running_mean.sub_(shift.to(bn.running_mean.device, bn.running_mean.dtype))
        out["mean_shift"] = float(shift.abs().max())
    if se and fc1 is not None:
        shift = _refit_layer(fc1, moments.se, kept, removed, ridge)
        with torch.no_grad():
            fc1.bias.add_(shift.to(fc1.bias.device, fc1.bias.dtype))
        out["gate_shift"] = float(shift.abs().max())
    return out


def refit_oneshot(model, blocks, selection, stats, ridge=0.0):
    """``apply_block_refit`` for every block of ``selection`` from the original model's moments (in place).

    Returns {block: apply_block_refit summary}. Prune with ``prune.prune_blocks`` afterwards.
    """
    selection = validate_indices(blocks, selection)
    moments = {b: oneshot_moments(stats, b, blocks[b]) for b, idx in selection.items() if idx}
    return {b: apply_block_refit(model, blocks[b], idx, moments[b], ridge) for b, idx in selection.items() if idx}


# ----------------------------------------------------------------------------------------------------------
# sequential refit: block by block, the partially pruned model's inputs toward the original's outputs


class _Stop(Exception):
    """Raised by a hook once every tensor a pass needs is captured: the rest of the forward is skipped."""


def _images(batch):
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def _grab(model, roles, block, what):
    """Forward hooks storing the tensors ``what`` needs into a dict; the last one stops the forward."""
    got, handles = {}, []
    modules = dict(model.named_modules())
    wanted = []
    if "input" in what:
        wanted.append((block, "pre", "input"))
    if "pooled" in what:
        wanted.append((roles.get("depthwise_act", roles["depthwise_bn"]), "post", "pooled"))
    if "project" in what:
        wanted.append((roles["project"], "pre", "project"))
    last = wanted[-1][2]

    def store(key, x):
        got[key] = x.mean((2, 3)) if key == "pooled" else x
        if key == last:
            raise _Stop

    for module, kind, key in wanted:
        if kind == "pre":
            handles.append(modules[module].register_forward_pre_hook(lambda m, a, key=key: store(key, a[0])))
        else:
            handles.append(modules[module].register_forward_hook(lambda m, a, o, key=key: store(key, o)))
    return got, handles


def _run_to(model, images, roles, block, what):
    """The tensors ``what`` of ``model`` on ``images``, running the forward only as far as needed."""
    got, handles = _grab(model, roles, block, what)
    try:
        with contextlib.suppress(_Stop):  # raised by the last hook on purpose: the rest of the forward is not needed
            model(images)
    finally:
        for h in handles:
            h.remove()
    return got


def block_fit_moments(original, model, batches, block, roles, kind="project", kept=None, residual_target=False):
    """``FitMoments`` of one block's project conv input (``kind="project"``, over positions) or pooled pre-gate
    SE input (``kind="se"``, per image): x from ``original``, y from ``model`` (the same model: oneshot
    moments), both run on every batch of ``batches`` only as far as the block's layer. ``kept``: the
    channels of y measured (others are 0 in mean_y / cov_xy / cov_yy; default all). ``residual_target``:
    x also holds the two models' block-input difference (C + out rows; use on residual blocks only).
    """
    kept = list(range(roles["hidden_channels"])) if kept is None else list(kept)
    return _pass(original, model, batches, roles, block, kept, kind, residual_target)


def _pass(original, pruned, batches, roles, block, kept, kind, residual_target):
    """FitMoments of one layer kind ("project" or "se") for block ``block``: original x, pruned y_K."""
    if kind not in ("project", "se"):
        raise PruneError(f"unknown moment kind {kind!r}: use project or se")
    key = "project" if kind == "project" else "pooled"
    what = {key} | ({"input"} if residual_target and kind == "project" else set())
    acc = None
    k = torch.as_tensor(kept, dtype=torch.long)
    with torch.no_grad():
        for batch in batches:
            images = _images(batch)
            a = _run_to(original, images, roles, block, what)
            b = a if pruned is original else _run_to(pruned, images, roles, block, what)
            x = rows_of(a[key])
            if "input" in what:
                x = torch.cat([x, rows_of(a["input"] - b["input"])], 1)
            k = k.to(b[key].device)  # moved once: a copy per batch would wait for a GPU
            y = rows_of(b[key])[:, k]
            if acc is None:
                acc = Moments(x.shape[1] + y.shape[1], cols=y.shape[1], device=x.device)
            acc.add(torch.cat([x, y], 1))
    if acc is None:
        raise PruneError(f"block {block}: the sequential refit saw no batches")
    cov, dx = acc.cov().cpu(), x.shape[1]
    mean = acc.mean.cpu()
    # mean_y / cov_yy over all C channels, with zeros outside K (refit reads only K)
    c = roles["hidden_channels"]
    mean_y = torch.zeros(c, dtype=torch.float64)
    mean_y[k] = mean[dx:]
    cov_xy = torch.zeros(dx, c, dtype=torch.float64)
    cov_xy[:, k] = cov[:dx]
    cov_yy = torch.zeros(c, c, dtype=torch.float64)
    cov_yy[k[:, None], k[None, :]] = cov[dx:]
    return FitMoments(mean[:dx], mean_y, cov_xy, cov_yy)


def sequential_refit(
    original, batches_fn, selection, ridge=0.0, residual_target=False, exact_gate=True, image_size=64, log=None
):
    """Refit and prune a copy of ``original`` block by block in forward order; returns (pruned model, report).

    ``batches_fn()`` yields batches (images, or (images, labels)) on the models' device, the same each call.
    For each block of ``selection`` {block: removed indices} in forward order, both the original and the
    partially refit model run on the batches (only up to the block's project conv), and the block's SE fc1
    and project conv are refit from the cross moments of the original's inputs x and the refit model's
    y_K toward the ORIGINAL model's outputs (``apply_block_refit``), so upstream errors are corrected, not
    compounded. ``exact_gate``: in an SE block, refit fc1 first and measure the project inputs in a second
    pass through the new gate (else one pass measures both, before the fc1 refit). ``residual_target``:
    in a residual block the project target also absorbs the difference of the two models' block inputs
    (target W x + (in_orig - in_pruned) / s). The removed columns are zeroed as the walk goes, so the
    refit model is already the pruned one; ``prune.prune_blocks`` removes all channels at the end.

    The report: {block: {"removed", "mean_shift", "gate_shift", "fit_error"}}, ``fit_error`` the block's
    relative output error on the fit batches (``block_errors``), for every block of the model.
    """
    original = original.eval()
    model = copy.deepcopy(original).eval()
    blocks = find_blocks(model)
    selection = validate_indices(blocks, selection)
    report = {}
    for block, roles in blocks.items():
        removed = selection.get(block) or []
        if not removed:
            continue
        report[block] = _refit_block(
            original, model, batches_fn, block, roles, removed, ridge, residual_target, exact_gate
        )
        if log is not None:
            log(f"sequential refit {block}: {len(removed)} removed")
    errors = block_errors(original, model, batches_fn(), list(blocks))
    prune_blocks(model, blocks, {b: i for b, i in selection.items() if i}, image_size)
    for block in blocks:
        report.setdefault(block, {"removed": 0, "mean_shift": None, "gate_shift": None})["fit_error"] = errors[block]
    return model, report


def _refit_block(original, model, batches_fn, block, roles, removed, ridge, residual_target, exact_gate):
    """Measure and apply one block's sequential refit on ``model`` (unpruned block, earlier blocks refit)."""
    kept = kept_indices(roles["hidden_channels"], removed)
    residual = residual_target and roles["has_residual"]
    se = _pass(original, model, batches_fn(), roles, block, kept, "se", False) if roles.get("se_fc1") else None
    gate = {}
    if se is not None and exact_gate:  # the new gate shapes the project inputs measured next
        gate = apply_block_refit(model, roles, removed, BlockMoments(None, se), ridge, project=False)
        se = None
    project = _pass(original, model, batches_fn(), roles, block, kept, "project", residual)
    out = apply_block_refit(model, roles, removed, BlockMoments(project, se), ridge)
    if gate:
        out["gate_shift"] = gate["gate_shift"]
    return out


def _block_outputs(model, names, sink):
    """Forward hooks putting each named block's output into ``sink(name, tensor)``; returns the handles."""
    modules = dict(model.named_modules())
    for n in names:
        if not isinstance(modules.get(n), InvertedResidual):
            raise PruneError(f"{n} is not an inverted-residual block of this {type(model).__name__}")
    return [modules[n].register_forward_hook(lambda m, a, o, n=n: sink(n, o)) for n in names]


def block_errors(original, pruned, batches, names):
    """{block: relative output error}: sum |out_orig - out_pruned|**2 / sum |out_orig - mean(out_orig)|**2.

    Both models run on every batch of ``batches`` (images or (images, labels)); ``names`` are block names
    (identical in both models, as after ``prune.prune_blocks``). The denominator's per-channel means and
    variances are streamed (``moments.Moments``, diagonal), so near-constant channels stay exact.
    """
    err, var = {}, {}  # err: tensors on the models' device, read once at the end (no wait per batch on a GPU)
    ref = {}

    def keep(n, o):
        ref[n] = o

    def compare(n, o):
        err[n] = err.get(n, 0) + ((ref[n] - o).double() ** 2).sum()
        rows = rows_of(ref[n])
        var.setdefault(n, Moments(rows.shape[1], diagonal=True, device=rows.device)).add(rows)

    seen = 0
    with torch.no_grad():
        for batch in batches:
            images = _images(batch)
            for model, fn in ((original, keep), (pruned, compare)):
                handles = _block_outputs(model, names, fn)
                try:
                    model.eval()(images)
                finally:
                    for h in handles:
                        h.remove()
            seen += 1
    if not seen:
        raise PruneError("block_errors: no batches")
    silent = [n for n in names if n not in var]
    if silent:
        raise PruneError(f"block_errors: block {silent[0]} never ran in the pruned model's forward pass")
    return {n: float(err[n]) / max(float(var[n].m2.sum()), torch.finfo(torch.float64).tiny) for n in names}


def folder(mode, original=None, batches_fn=None, ridge=0.0, residual_target=False, exact_gate=True):
    """The refit as the ``compensate_fn(model, blocks, selection, stats)`` that pruning and iterative take.

    ``"oneshot"``: every block from the captured moments of the model it is applied to (``refit_oneshot``).
    ``"sequential"``: the blocks of ``selection`` in forward order, each measured on ``model`` (whose earlier
    blocks are already refit, or pruned) toward ``original``'s outputs on ``batches_fn()``, as in
    ``sequential_refit``. Either way ``model`` is changed in place, before ``prune.prune_blocks``.
    """
    if mode == "oneshot":
        return lambda model, blocks, selection, stats: refit_oneshot(model, blocks, selection, stats, ridge)
    if mode != "sequential":
        raise PruneError(f"unknown RECONSTRUCT {mode!r}: use sequential, oneshot or none")

    def fold(model, blocks, selection, stats):
        selection = validate_indices(blocks, selection)
        return {
            block: _refit_block(
                original, model, batches_fn, block, roles, selection[block], ridge, residual_target, exact_gate
            )
            for block, roles in blocks.items()
            if selection.get(block)
        }

    return fold
