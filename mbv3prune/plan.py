"""Scores per channel, candidate channels, floors and rounding, and the pruning-plan file.

A block is scored on one captured layer, its *proposal layer* (``blocks.capture_layer``), whose channels
are the block's hidden channels. Every score becomes a *prunability*, higher = prune first, so proposing
and global ranking share one code path. What makes a channel a *candidate* depends on the score:

==============  ==================================================  =====================================
score           value per channel                                   candidate when
==============  ==================================================  =====================================
deadness        fraction of |a| < THRESHOLD (higher = prunable)     deadness > DEADNESS_THRESHOLD
mean_abs        mean |a| (lower = prunable)                         mean |a| < THRESHOLD
contribution    mean |a| x L2 norm of the project conv's input      contribution < THRESHOLD
                column for the channel (lower = prunable)
fluctuation     std(a) x the same L2 norm (lower = prunable): the    fluctuation < THRESHOLD
                RMS change of the project output that removing the
                channel leaves after mean compensation
==============  ==================================================  =====================================

THRESHOLD is thus an activation magnitude for deadness and mean_abs, and a cut on mean |a| x ||w|| (or
std(a) x ||w||) for contribution (fluctuation); the deadness written to the plan file (and used by class-aware mode) is always the fraction
of |a| < THRESHOLD. Class-aware mode keeps every channel that is alive (per-class deadness <=
DEADNESS_THRESHOLD) for some class with at least MIN_CLASS_SAMPLES images. ``keep_count`` then applies the
floors and rounding, and the most prunable candidates are pruned (ties: lower channel index first).

The capture format (``LAYER/below``, ``LAYER/hist``, ``hist_edges``...) is read only by the few ``_stat``
helpers below, so a change there touches one place. ``layers`` is either {block: proposal layer} or
capture's {layer: {"block", "proposal", ...}} description.
"""
import math

import torch
from torch import nn

from .artifacts import read_json, write_json
from .blocks import capture_layer
from .capture import deadness_from_hist
from .errors import PruneError

SCORES = ("deadness", "mean_abs", "contribution", "fluctuation")
WEIGHTED = ("contribution", "fluctuation")  # scores that need the consumer (project conv) weights
PLAN_KIND = "mbv3prune-plan"
PLAN_SCHEMA_VERSION = 1
FLOOR = 8  # never keep fewer hidden channels than this (or all of them, in a block narrower than this)
DECIMALS = 6  # floats in the plan file are rounded to this many decimals


# --- access to the capture format -----------------------------------------------------------------------

def _stat(stats, layer, key):
    """The tensor ``LAYER/key`` of the activation stats, or a PruneError naming it."""
    name = f"{layer}/{key}"
    if name not in stats:
        raise PruneError(f"activation stats have no {name}: was layer {layer} captured?")
    return stats[name]


def _has_layer(stats, layer):
    return f"{layer}/n" in stats


def _edges(stats):
    if "hist_edges" not in stats:
        raise PruneError("activation stats have no hist_edges: they were not written by capture")
    return stats["hist_edges"]


def _captured_threshold(stats):
    """The THRESHOLD the ``below`` counts were taken at, or None when the stats do not record it."""
    value = stats.get("threshold")
    return None if value is None else float(value)


def _elements(stats, layer):
    """Elements counted per channel (images x positions), checked positive."""
    n = int(_stat(stats, layer, "n"))
    if n <= 0:
        raise PruneError(f"activation stats {layer}/n is {n}: no activations were counted for {layer}")
    return n


def _fraction_below(hist, edges, threshold):
    """Fraction of |a| < threshold from histograms [..., NB] (capture.deadness_from_hist, bins checked first)."""
    if hist.shape[-1] < 1 or edges.numel() != hist.shape[-1] + 1:
        raise PruneError(f"activation stats: {hist.shape[-1]} histogram bins but {edges.numel()} hist_edges")
    return deadness_from_hist(hist, edges.cpu(), threshold)


# --- scores -----------------------------------------------------------------------------------------------

def check_score(score):
    """``score`` itself, or a PruneError listing the valid scores."""
    if score not in SCORES:
        raise PruneError(f"unknown SCORE {score!r}: use one of {', '.join(SCORES)}")
    return score


def channel_deadness(stats, layer, threshold):
    """Per channel fraction of |a| < threshold: the exact count at the captured THRESHOLD, else the histogram."""
    captured = _captured_threshold(stats)
    if captured is not None and math.isclose(threshold, captured, rel_tol=1e-6):
        return _stat(stats, layer, "below").double() / _elements(stats, layer)
    return _fraction_below(_stat(stats, layer, "hist"), _edges(stats), threshold)


def mean_abs(stats, layer):
    """Per channel mean |a|."""
    return _stat(stats, layer, "sum_abs").double() / _elements(stats, layer)


def std(stats, layer):
    """Per channel standard deviation of a (population: sum_sq / n - mean**2, clamped at 0)."""
    n = _elements(stats, layer)
    mean = _stat(stats, layer, "sum").double() / n
    return (_stat(stats, layer, "sum_sq").double() / n - mean ** 2).clamp_min(0).sqrt()


def consumer_weight(weights, roles):
    """The project conv's weight of a block, from a model or a state_dict (the consumer of its hidden channels)."""
    state = weights.state_dict() if isinstance(weights, nn.Module) else weights
    key = f"{roles['project']}.weight"
    if key not in state:
        raise PruneError(f"weights have no {key}: they do not belong to this model")
    return state[key]


def _input_column_norms(weight):
    """L2 norm of each input channel's column of a conv weight [out, in, kh, kw]."""
    w = weight.detach().double()
    return w.transpose(0, 1).reshape(w.shape[1], -1).norm(dim=1)


def channel_score(stats, layer, score, threshold=None, consumer=None):
    """Per channel value of ``score`` (deadness, mean |a|, contribution or fluctuation), before orienting it."""
    if check_score(score) == "deadness":
        threshold = _captured_threshold(stats) if threshold is None else threshold
        if threshold is None:
            raise PruneError("SCORE=deadness needs a THRESHOLD: the activation stats do not record one")
        return channel_deadness(stats, layer, threshold)
    value = mean_abs(stats, layer) if score != "fluctuation" else std(stats, layer)
    if score == "mean_abs":
        return value
    if consumer is None:
        raise PruneError(f"SCORE={score} needs the model's weights to score {layer}")
    norms = _input_column_norms(consumer).to(value.device)
    if norms.shape != value.shape:
        raise PruneError(f"{layer} has {value.numel()} channels but its consumer conv takes {norms.numel()}")
    return value * norms


def prunability(stats, layer, score, threshold=None, consumer=None):
    """Per channel prunability of ``score``: HIGHER = prune first, whatever the score."""
    return _oriented(channel_score(stats, layer, score, threshold, consumer), score)


def _oriented(value, score):
    """A score's values turned so that higher = more prunable."""
    return value if score == "deadness" else -value


def is_candidate(value, score, threshold, deadness_threshold):
    """Candidate mask from a score's values: deadness > DEADNESS_THRESHOLD, else value < THRESHOLD."""
    return value > deadness_threshold if check_score(score) == "deadness" else value < threshold


# --- class awareness --------------------------------------------------------------------------------------

def class_deadness(stats, layer, threshold, min_class_samples):
    """Per-class deadness [K', C] at ``threshold`` over the classes with >= ``min_class_samples`` images."""
    if min_class_samples < 1:
        raise PruneError(f"MIN_CLASS_SAMPLES must be at least 1, not {min_class_samples}")
    dead = _fraction_below(_stat(stats, layer, "hist_class"), _edges(stats), threshold)
    images = _stat(stats, layer, "n_class").to(dead.device)
    return dead[images >= min_class_samples]


def class_deadness_range(stats, layer, threshold, min_class_samples):
    """(min, max) per channel of the per-class deadness; NaN when no class has enough images."""
    dead = class_deadness(stats, layer, threshold, min_class_samples)
    if dead.shape[0] == 0:
        nan = torch.full(dead.shape[1:], math.nan, dtype=torch.float64, device=dead.device)
        return nan, nan
    return dead.amin(0), dead.amax(0)


def alive_for_some_class(stats, layer, threshold, deadness_threshold, min_class_samples):
    """Mask of channels alive (deadness <= DEADNESS_THRESHOLD) for some class with enough images."""
    dead = class_deadness(stats, layer, threshold, min_class_samples)
    return (dead <= deadness_threshold).any(0)


# --- floors, candidates, proposals ------------------------------------------------------------------------

def min_kept(hidden, min_keep_ratio=0.25, floor=FLOOR):
    """The fewest channels a block of ``hidden`` may keep: ceil(ratio x hidden), and ``floor`` (or all, if fewer)."""
    if not 0 <= min_keep_ratio <= 1:
        raise PruneError(f"MIN_KEEP_RATIO must lie in [0, 1], not {min_keep_ratio}")
    return max(math.ceil(round(min_keep_ratio * hidden, 9)), min(floor, hidden))


def keep_count(hidden, n_candidates, min_keep_ratio=0.25, floor=FLOOR, round_to=8):
    """Channels kept when ``n_candidates`` may go: the floors, then rounded up to ``round_to`` (all if that exceeds)."""
    if not 0 <= n_candidates <= hidden:
        raise PruneError(f"{n_candidates} candidates for a block of {hidden} channels")
    if round_to < 1:
        raise PruneError(f"ROUND_TO must be at least 1, not {round_to}")
    kept = max(hidden - n_candidates, min_kept(hidden, min_keep_ratio, floor))
    rounded = -(-kept // round_to) * round_to
    return rounded if rounded <= hidden else hidden


def proposal_layers(blocks, capture_point):
    """{block: proposal layer} for every block, from the capture point (see blocks.capture_layer)."""
    return {name: capture_layer(roles, capture_point) for name, roles in blocks.items()}


def proposal_map(layers):
    """{block: proposal layer} from either that map or capture's {layer: {"block", "proposal", ...}} description."""
    if all(isinstance(v, str) for v in layers.values()):
        return dict(layers)
    return {info["block"]: layer for layer, info in layers.items()
            if isinstance(info, dict) and info.get("proposal") and "block" in info}


def _require(block, layer):
    if layer is None:
        raise PruneError(f"no captured layer is given for block {block}")
    return layer


def _skip_reason(name, roles, skip_blocks):
    if name in skip_blocks:
        return "listed in SKIP_BLOCKS"
    if "expand" not in roles:
        return "no expand conv: its hidden channels are the block's input"
    return None


def block_candidates(stats, roles, layer, score, threshold, deadness_threshold, class_aware=False,
                     min_class_samples=1, weights=None):
    """(prunability, candidate mask) of a block's hidden channels, scored on ``layer``."""
    consumer = consumer_weight(weights, roles) if score in WEIGHTED and weights is not None else None
    value = channel_score(stats, layer, score, threshold, consumer)
    if value.numel() != roles["hidden_channels"]:
        raise PruneError(f"activation stats for {layer} have {value.numel()} channels, but the block has "
                         f"{roles['hidden_channels']}: the stats belong to another model")
    candidate = is_candidate(value, score, threshold, deadness_threshold)
    if class_aware:
        candidate &= ~alive_for_some_class(stats, layer, threshold, deadness_threshold, min_class_samples)
    return _oriented(value, score), candidate


def most_prunable(prun, candidate, count):
    """Sorted indices of the ``count`` candidates with the highest prunability (ties: lower index first)."""
    idx = torch.nonzero(candidate).flatten()
    order = torch.sort(prun[idx], descending=True, stable=True).indices
    return sorted(idx[order[:count]].tolist())


def _check_skips(blocks, skip_blocks):
    unknown = [b for b in skip_blocks if b not in blocks]
    if unknown:
        raise PruneError(f"SKIP_BLOCKS names unknown block {unknown[0]!r}: blocks are {', '.join(blocks)}")


def _propose_block(stats, name, roles, layer, opts):
    """One block's proposal: {layer, hidden_channels, candidates, kept, prune[, skipped]}."""
    hidden = roles["hidden_channels"]
    entry = {"hidden_channels": hidden, **({"layer": layer} if layer else {}), "candidates": 0, "kept": hidden,
             "prune": []}
    reason = _skip_reason(name, roles, opts["skip_blocks"])
    if reason:
        return {**entry, "skipped": reason}
    prun, candidate = block_candidates(stats, roles, _require(name, layer), opts["score"], opts["threshold"],
                                       opts["deadness_threshold"], opts["class_aware"],
                                       opts["min_class_samples"], opts["weights"])
    n = int(candidate.sum())
    kept = keep_count(hidden, n, opts["min_keep_ratio"], FLOOR, opts["round_to"])
    return {**entry, "candidates": n, "kept": kept, "prune": most_prunable(prun, candidate, hidden - kept)}


def propose(stats, blocks, layers, score="deadness", *, threshold, deadness_threshold, min_keep_ratio=0.25,
            round_to=8, class_aware=False, min_class_samples=1, skip_blocks=(), weights=None):
    """{block: proposal} for every block; blocks without an expand conv, or skipped, prune nothing and say why."""
    check_score(score)
    _check_skips(blocks, skip_blocks)
    opts = dict(score=score, threshold=threshold, deadness_threshold=deadness_threshold,
                min_keep_ratio=min_keep_ratio, round_to=round_to, class_aware=class_aware,
                min_class_samples=min_class_samples, skip_blocks=tuple(skip_blocks), weights=weights)
    layers = proposal_map(layers)
    return {name: _propose_block(stats, name, roles, layers.get(name), opts) for name, roles in blocks.items()}


def rank_global(stats, blocks, layers, score="deadness", *, threshold, deadness_threshold, class_aware=False,
                min_class_samples=1, skip_blocks=(), weights=None):
    """Every candidate channel of every proposable block as (prunability, block, channel), most prunable first."""
    check_score(score)
    _check_skips(blocks, skip_blocks)
    layers, ranked = proposal_map(layers), []
    for order, (name, roles) in enumerate(blocks.items()):
        if _skip_reason(name, roles, skip_blocks):
            continue
        prun, candidate = block_candidates(stats, roles, _require(name, layers.get(name)), score, threshold,
                                           deadness_threshold, class_aware, min_class_samples, weights)
        channels = torch.nonzero(candidate).flatten().tolist()
        ranked += [(p, order, name, c) for p, c in zip(prun[candidate].tolist(), channels)]
    ranked.sort(key=lambda r: (-r[0], r[1], r[3]))
    return [(p, name, c) for p, _, name, c in ranked]


# --- the plan file ----------------------------------------------------------------------------------------

def _rounded(values):
    """A tensor as a list of floats rounded to DECIMALS (NaN becomes None)."""
    return [None if math.isnan(v) else round(v, DECIMALS) for v in values.tolist()]


def plan_layers(stats, proposals, threshold, min_class_samples):
    """{proposal layer: channel deadness and per-class min / max deadness} for the plan file."""
    out = {}
    for entry in proposals.values():
        layer = entry.get("layer")
        if layer is None or not _has_layer(stats, layer):
            continue
        low, high = class_deadness_range(stats, layer, threshold, min_class_samples)
        out[layer] = {"channel_deadness": _rounded(channel_deadness(stats, layer, threshold)),
                      "class_deadness_min": _rounded(low), "class_deadness_max": _rounded(high)}
    return out


def make_plan(proposals, stats, *, arch, widths, checkpoint_sha256, capture_point, score, threshold,
              deadness_threshold, class_aware, min_class_samples, min_keep_ratio, round_to, provenance):
    """The plan-file dict (schema_version 1) of ``proposals``."""
    return {
        "schema_version": PLAN_SCHEMA_VERSION,
        "kind": PLAN_KIND,
        "model": {"arch": arch, "widths": widths, "checkpoint_sha256": checkpoint_sha256},
        "capture_point": capture_point,
        "threshold": threshold,
        "deadness_threshold": deadness_threshold,
        "score": check_score(score),
        "class_aware": class_aware,
        "min_class_samples": min_class_samples,
        "min_keep_ratio": min_keep_ratio,
        "round_to": round_to,
        "layers": plan_layers(stats, proposals, threshold, min_class_samples),
        "blocks": {name: {**entry, "prune": sorted(entry["prune"])} for name, entry in proposals.items()},
        "provenance": provenance,
    }


def write_plan(path, plan):
    """Write the plan file atomically (indent 2; the same plan always gives the same bytes)."""
    return write_json(path, plan)


# --- validating a plan file -------------------------------------------------------------------------------

_TOP = (("schema_version", "int"), ("kind", "str"), ("model", "dict"), ("capture_point", "str"),
        ("threshold", "number"), ("deadness_threshold", "number"), ("score", "str"), ("class_aware", "bool"),
        ("min_class_samples", "int"), ("min_keep_ratio", "number"), ("round_to", "int"), ("layers", "dict"),
        ("blocks", "dict"), ("provenance", "dict"))
_MAX_CHANNELS = 2 ** 31 - 1
_LAYER_LISTS = ("channel_deadness", "class_deadness_min", "class_deadness_max")


def _is_kind(value, kind):
    """Whether a JSON value is of ``kind``; bools are not numbers, NaN and infinities are not numbers."""
    if kind.endswith("?") and value is None:
        return True
    kind = kind.rstrip("?")
    if kind in ("int", "number") and isinstance(value, bool):
        return False
    if kind == "number":
        return isinstance(value, int) or isinstance(value, float) and math.isfinite(value)
    return isinstance(value, {"int": int, "str": str, "bool": bool, "dict": dict, "list": list}[kind])


def _bad(path, where, problem):
    return PruneError(f"pruning plan {path}: {where} {problem}")


def _short(value):
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _get(path, obj, key, kind, where=""):
    """``obj[key]`` checked to be of ``kind`` (a trailing ? allows null), or a PruneError naming the key."""
    at = f"{where}.{key}" if where else key
    if key not in obj:
        raise _bad(path, at, "is missing")
    if not _is_kind(obj[key], kind):
        raise _bad(path, at, f"must be {kind.rstrip('?')}{' or null' if kind.endswith('?') else ''}, "
                             f"not {_short(obj[key])}")
    return obj[key]


def _check_range(path, where, value, low, high=None):
    if value < low or high is not None and value > high:
        raise _bad(path, where, f"is {_short(value)}, outside [{low}, {high if high is not None else 'inf'}]")


def _check_header(path, plan):
    if not isinstance(plan, dict):
        raise _bad(path, "top level", f"must be a JSON object, not {type(plan).__name__}")
    for key, kind in _TOP:
        _get(path, plan, key, kind)
    if plan["schema_version"] != PLAN_SCHEMA_VERSION:
        raise _bad(path, "schema_version", f"is {plan['schema_version']}: this version reads {PLAN_SCHEMA_VERSION}")
    if plan["kind"] != PLAN_KIND:
        raise _bad(path, "kind", f"is {_short(plan['kind'])}, not {PLAN_KIND!r}")
    if plan["score"] not in SCORES:
        raise _bad(path, "score", f"is {_short(plan['score'])}: use one of {', '.join(SCORES)}")
    _check_range(path, "threshold", plan["threshold"], 0)
    _check_range(path, "deadness_threshold", plan["deadness_threshold"], 0, 1)
    _check_range(path, "min_keep_ratio", plan["min_keep_ratio"], 0, 1)
    _check_range(path, "min_class_samples", plan["min_class_samples"], 1)
    _check_range(path, "round_to", plan["round_to"], 1)


def _check_model(path, model):
    _get(path, model, "arch", "str", "model")
    _get(path, model, "checkpoint_sha256", "str?", "model")
    for layer, w in _get(path, model, "widths", "dict", "model").items():
        if not isinstance(w, dict) or not all(_is_kind(v, "int") for v in w.values()):
            raise _bad(path, f"model.widths.{layer}", f"must map names to integers, not {_short(w)}")


def _check_fractions(path, where, values, nullable):
    for i, v in enumerate(values):
        if not (v is None and nullable) and not (_is_kind(v, "number") and 0 <= v <= 1):
            raise _bad(path, f"{where}[{i}]", f"is {_short(v)}, not a fraction in [0, 1]")


def _check_layers(path, layers):
    for layer, entry in layers.items():
        where = f"layers.{layer}"
        if not isinstance(entry, dict):
            raise _bad(path, where, f"must be an object, not {_short(entry)}")
        lists = [_get(path, entry, key, "list", where) for key in _LAYER_LISTS]
        if len({len(v) for v in lists}) != 1:
            raise _bad(path, where, f"lists have different lengths {[len(v) for v in lists]}")
        for key, values in zip(_LAYER_LISTS, lists):
            _check_fractions(path, f"{where}.{key}", values, nullable=key != "channel_deadness")


def _check_indices(path, where, indices, hidden):
    seen = set()
    for i, v in enumerate(indices):
        if not _is_kind(v, "int"):
            raise _bad(path, f"{where}[{i}]", f"is {_short(v)}, not a channel index (an integer)")
        if v < 0 or v >= hidden:
            raise _bad(path, f"{where}[{i}]", f"is {v}, outside the block's channels 0..{hidden - 1}")
        if v in seen:
            raise _bad(path, f"{where}[{i}]", f"repeats channel {v}")
        seen.add(v)


def _check_block_name(path, name, hidden, blocks):
    if blocks is None:
        return
    if name not in blocks:
        raise _bad(path, f"blocks.{name}", f"is not a block of this model (blocks: {', '.join(blocks)})")
    roles = blocks[name] if isinstance(blocks, dict) else None
    if isinstance(roles, dict) and roles.get("hidden_channels", hidden) != hidden:
        raise _bad(path, f"blocks.{name}.hidden_channels", f"is {hidden}, but the model's block has "
                                                          f"{roles['hidden_channels']}")


def _check_block(path, plan, name, entry, blocks):
    where = f"blocks.{name}"
    if not isinstance(entry, dict):
        raise _bad(path, where, f"must be an object, not {_short(entry)}")
    hidden = _get(path, entry, "hidden_channels", "int", where)
    _check_range(path, f"{where}.hidden_channels", hidden, 1, _MAX_CHANNELS)
    _check_block_name(path, name, hidden, blocks)
    prune = _get(path, entry, "prune", "list", where)
    _check_indices(path, f"{where}.prune", prune, hidden)
    kept = _get(path, entry, "kept", "int", where)
    if kept != hidden - len(prune):
        raise _bad(path, f"{where}.kept", f"is {kept}, but hidden_channels - len(prune) = {hidden - len(prune)}")
    floor = min_kept(hidden, plan["min_keep_ratio"])
    if kept < floor:
        raise _bad(path, where, f"keeps {kept} of {hidden} channels, below the floor of {floor} "
                                f"({FLOOR} channels and min_keep_ratio {plan['min_keep_ratio']})")
    if "skipped" in entry and _get(path, entry, "skipped", "str", where) and prune:
        raise _bad(path, f"{where}.prune", "must be empty in a skipped block")
    _check_block_layer(path, plan, where, entry, hidden)


def _check_block_layer(path, plan, where, entry, hidden):
    if "layer" not in entry:
        return
    layer = _get(path, entry, "layer", "str", where)
    values = plan["layers"].get(layer, {}).get("channel_deadness", [])
    if layer in plan["layers"] and len(values) != hidden:
        raise _bad(path, f"layers.{layer}", f"has {len(values)} channels, but {where} has {hidden}")


def first_width_difference(recorded, actual):
    """The first layer (model order) whose widths differ between two {layer: widths} maps, or None."""
    for name in list(actual) + [n for n in recorded if n not in actual]:
        if recorded.get(name) != actual.get(name):
            return name
    return None


def load_plan(path, blocks=None, widths=None):
    """Read and validate a plan file against the model's ``blocks`` and per-layer ``widths`` when given."""
    plan = read_json(path, "pruning plan")
    _check_header(path, plan)
    _check_model(path, plan["model"])
    _check_layers(path, plan["layers"])
    for name, entry in plan["blocks"].items():
        _check_block(path, plan, name, entry, blocks)
    layer = first_width_difference(plan["model"]["widths"], widths) if widths is not None else None
    if layer is not None:
        raise _bad(path, f"model.widths.{layer}", f"is {_short(plan['model']['widths'].get(layer))}, "
                                                  f"but the model has {_short(widths.get(layer))}")
    return plan


def check_plan_matches_model(plan, arch, widths, checkpoint_sha256, name="pruning plan"):
    """PruneError when the plan was made for another arch or widths; a warning string when only the sha256 differs."""
    model = plan["model"]
    if model["arch"] != arch:
        raise PruneError(f"{name} was made for {model['arch']}, but the model is {arch}")
    layer = first_width_difference(model["widths"], widths)
    if layer is not None:
        raise PruneError(f"{name} was made for a model whose layer {layer} has widths "
                         f"{model['widths'].get(layer)}, but this model's {layer} has {widths.get(layer)}")
    if model.get("checkpoint_sha256") != checkpoint_sha256:
        return (f"{name} was made from checkpoint sha256 {str(model.get('checkpoint_sha256'))[:12]}..., not "
                f"{str(checkpoint_sha256)[:12]}...: same architecture and widths, so it still applies")
    return None
