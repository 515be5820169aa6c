"""Compensation of removed hidden channels: folding their mean (and variance) contribution into kept layers.

Call ``compensate`` on the UNPRUNED model with the selection {block: [hidden channel indices]} that
``prune.prune_blocks`` removes next. The folded terms live in layers that pruning keeps whole (the project
BN's running statistics, the SE fc1 bias), so they survive it. A removed hidden channel c feeds:

* the project conv (1x1, no bias, then BN). It added W[:, c] * a_c to the project output z, where a_c is the
  project conv's INPUT (after the depthwise activation and the SE gate). BN in eval mode computes
  (z - running_mean) / sqrt(running_var + eps) * weight + bias, so ``running_mean -= W[:, R] @ mean(a_R)``
  keeps the output exactly when every removed a_c is constant, and keeps its mean otherwise.
* the SE fc1 (1x1 conv on the spatial mean of the depthwise activation d BEFORE the gate). It added
  fc1.weight[:, c] * pool(d_c), so ``fc1.bias += fc1.weight[:, R] @ mean(d_R)`` keeps the gate of the kept
  channels exactly when every removed d_c is constant.

The means come from a capture with CAPTURE_POINT=project_input: ``{project}/sum`` / ``{project}/n`` and
``{block}/pregate_sum`` / ``{block}/pregate_n``. No other capture point gives mean(a): the SE gate scales d
per image, and mean(gate * d) is not mean(gate) * mean(d), so they are refused.

Variance correction (``correct_variance=True``, or ``correct_project_variance``): the removed channels also
carried part of the project output's variance, which the project BN's running_var was calibrated for.
ASSUMING the removed project inputs are uncorrelated with each other and with the kept channels'
contribution, Var(z after) = Var(z) - sum_c W[:, c]**2 Var(a_c), with Var(a_c) = sum_sq / n - mean**2 from
the capture; running_var is lowered by that, but never below ``VAR_FLOOR`` times its old value.
Correlated channels make the prediction wrong by the covariance terms (either sign).

Everything runs on the model's device, in float64 for float64 models and float32 otherwise.
"""

from collections import namedtuple

import torch
from torchvision.models.mobilenetv3 import InvertedResidual

from .activation_stats import ActivationStats
from .errors import PruneError
from .prune import validate_indices

VAR_FLOOR = 0.1  # running_var never drops below this fraction of its value before the correction

# the checked inputs of one block's compensation: modules, removed indices and per-channel statistics (CPU float64)
_Terms = namedtuple("_Terms", "name idx project project_bn fc1 mean var pregate")


def require_project_input(capture_point):
    """PruneError unless the statistics were captured at the project conv's input."""
    if capture_point != "project_input":
        raise PruneError(
            f"compensation needs CAPTURE_POINT=project_input statistics (the project conv's input, "
            f"after the SE gate), not {capture_point!r}: the mean of the gated input cannot be "
            "recovered from the other capture points"
        )


def _block_name(model, roles):
    """Name of the InvertedResidual holding the block's depthwise conv (the key of its pre-gate statistics)."""
    names = [
        n
        for n, m in model.named_modules()
        if isinstance(m, InvertedResidual) and roles["depthwise"].startswith(n + ".")
    ]
    if not names:
        raise PruneError(
            f"layer {roles['depthwise']} is in no inverted-residual block of this "
            f"{type(model).__name__}: roles of another model?"
        )
    return max(names, key=len)


def project_input_moments(stats, roles):
    """(mean, variance) per hidden channel (CPU float64) of a block's project conv input, from a capture."""
    return ActivationStats.of(stats).project_input_moments(roles)


def _module(model, name):
    """``model``'s submodule ``name``, or PruneError."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise PruneError(f"the model has no layer {name}: roles of another model?") from None


def _pointwise(model, name, in_channels):
    """The 1x1 conv ``name``, checked to take ``in_channels`` inputs (else the roles are stale)."""
    conv = _module(model, name)
    if tuple(conv.kernel_size) != (1, 1) or conv.groups != 1:
        raise PruneError(f"layer {name} is not a 1x1 conv: cannot fold a channel mean into it")
    if conv.in_channels != in_channels:
        raise PruneError(
            f"layer {name} has {conv.in_channels} input channels, the roles record {in_channels}: "
            "compensate before pruning, with roles from find_blocks on this model"
        )
    return conv


def _terms(model, roles, removed, stats):
    """Everything one block's compensation needs, checked; nothing is modified."""
    name = _block_name(model, roles)
    idx = validate_indices({name: roles}, {name: removed})[name]
    c = roles["hidden_channels"]
    project, bn = _pointwise(model, roles["project"], c), _module(model, roles["project_bn"])
    if getattr(bn, "running_mean", None) is None or getattr(bn, "running_var", None) is None:
        raise PruneError(f"layer {roles['project_bn']} keeps no running statistics: nothing to compensate into")
    mean, var = project_input_moments(stats, roles)
    fc1, pregate = None, None
    if roles.get("se_fc1") is not None:
        fc1 = _pointwise(model, roles["se_fc1"], c)
        pregate = ActivationStats.of(stats).pregate_mean(name, c)
        if fc1.bias is None:
            raise PruneError(f"layer {roles['se_fc1']} has no bias: nothing to compensate into")
    return _Terms(name, idx, project, bn, fc1, mean, var, pregate)


def _work(tensor):
    """The compute dtype for a layer: float64 for float64 layers, float32 otherwise (half stays accurate)."""
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


def _columns(conv, idx):
    """The 1x1 conv's weight columns ``idx`` as an [out, len(idx)] matrix in the compute dtype."""
    w = conv.weight.detach()[:, idx, 0, 0]
    return w.to(_work(w))


def _fold(conv, idx, values):
    """conv.weight[:, idx] @ values[idx] on the conv's device: the removed channels' mean contribution."""
    w = _columns(conv, idx)
    return w @ values[idx].to(w.device, w.dtype)


def _fold_project(t):
    """running_mean -= W[:, R] @ mean(a_R); returns the largest |shift|."""
    delta = _fold(t.project, t.idx, t.mean)
    with torch.no_grad():
        t.project_bn.running_mean.sub_(delta.to(t.project_bn.running_mean.dtype))
    return float(delta.abs().max())


def _fold_se(t):
    """fc1.bias += fc1.weight[:, R] @ mean(d_R); returns the largest |shift| (None without SE)."""
    if t.fc1 is None:
        return None
    delta = _fold(t.fc1, t.idx, t.pregate)
    with torch.no_grad():
        t.fc1.bias.add_(delta.to(t.fc1.bias.dtype))
    return float(delta.abs().max())


def _fold_variance(t):
    """running_var -= sum_c W[:, c]**2 Var(a_c), floored at VAR_FLOOR * old; returns the largest relative drop."""
    w = _columns(t.project, t.idx)
    drop = (w**2) @ t.var[t.idx].to(w.device, w.dtype)
    rv = t.project_bn.running_var
    old = rv.to(drop.dtype)
    new = torch.maximum(old - drop, VAR_FLOOR * old)
    with torch.no_grad():
        rv.copy_(new.to(rv.dtype))
    return float(((old - new) / old.clamp(min=torch.finfo(old.dtype).tiny)).max())


def _apply(t, correct_variance):
    """Fold one block's checked terms in; a JSON-able summary of the sizes of the changes."""
    if not t.idx:
        return {"removed": 0, "mean_shift": 0.0, "gate_shift": None, "var_drop": None}
    return {
        "removed": len(t.idx),
        "mean_shift": _fold_project(t),
        "gate_shift": _fold_se(t),
        "var_drop": _fold_variance(t) if correct_variance else None,
    }


def compensate_project(model, roles, removed, stats):
    """Shift the project BN's running_mean by the removed channels' mean contribution (project_input stats)."""
    return _fold_project(_terms(model, roles, removed, stats))


def compensate_se(model, roles, removed, stats):
    """Add the removed channels' pre-gate mean contribution to the SE fc1 bias (None for a block without SE)."""
    return _fold_se(_terms(model, roles, removed, stats))


def correct_project_variance(model, roles, removed, stats):
    """Lower the project BN's running_var by the removed channels' predicted variance (see module docstring)."""
    return _fold_variance(_terms(model, roles, removed, stats))


def compensate_block(model, roles, removed, stats, capture_point="project_input", correct_variance=False):
    """Fold the mean (and, if asked, variance) of one block's channels ``removed`` into kept layers; before pruning."""
    require_project_input(capture_point)
    return _apply(_terms(model, roles, removed, stats), correct_variance)


def compensate(model, blocks, selection, stats, capture_point="project_input", correct_variance=False):
    """``compensate_block`` for every block of ``selection`` {block: indices}; all checked before any change.

    Returns {block: {"removed", "mean_shift", "gate_shift", "var_drop"}}: the count and the largest folded
    running_mean shift, fc1 bias shift (None without SE) and relative running_var drop (None unless corrected).
    """
    require_project_input(capture_point)
    selection = validate_indices(blocks, selection)
    terms = {name: _terms(model, blocks[name], idxs, stats) for name, idxs in selection.items()}
    for name, t in terms.items():
        if t.name != name:
            raise PruneError(
                f"block {name}: its roles belong to block {t.name} of this model: blocks of another model?"
            )
    return {name: _apply(t, correct_variance) for name, t in terms.items()}


def folder(capture_point="project_input", correct_variance=False):
    """``compensate`` as the ``compensate_fn(model, blocks, selection, stats)`` that pruning and iterative take."""
    return lambda model, blocks, selection, stats: compensate(
        model, blocks, selection, stats, capture_point, correct_variance
    )
