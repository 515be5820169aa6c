"""The pruning-plan file: written by the plan stage, read (and validated) by the pruning stage.

A plan records the criterion it was made with (``criterion.Criterion.plan_fields``), the model it is for
(arch, widths, checkpoint sha256), per proposal layer the channel deadness and its per-class range, and per
block the proposal: hidden channels, candidates, kept, the indices to prune and why a block is skipped.
``load_plan`` checks every field and names the first one at fault; ``check_plan_matches_model`` refuses a
plan made for another architecture or widths.
"""

import math

import torch

from .activation_stats import ActivationStats
from .artifacts import read_json, write_json
from .errors import PruneError
from .scores import SCORES
from .selection import FLOOR, min_kept

PLAN_KIND = "mbv3prune-plan"
PLAN_SCHEMA_VERSION = 1
DECIMALS = 6  # floats in the plan file are rounded to this many decimals


def _rounded(values):
    """A tensor as a list of floats rounded to DECIMALS (NaN becomes None)."""
    return [None if math.isnan(v) else round(v, DECIMALS) for v in values.tolist()]


def plan_layers(stats, proposals, threshold, min_class_samples):
    """{proposal layer: channel deadness and per-class min / max deadness} for the plan file."""
    stats, out = ActivationStats.of(stats), {}
    for entry in proposals.values():
        layer = entry.get("layer")
        if layer is None or not stats.has(layer):
            continue
        if stats.has_class_hist(layer):
            low, high = stats.class_deadness_range(layer, threshold, min_class_samples)
        else:  # PER_CLASS counts / off (thousands of species): no per-class range to show
            low = high = torch.full((stats.channels(layer),), math.nan, dtype=torch.float64)
        out[layer] = {
            "channel_deadness": _rounded(stats.deadness(layer, threshold)),
            "class_deadness_min": _rounded(low),
            "class_deadness_max": _rounded(high),
        }
    return out


def make_plan(proposals, stats, criterion, *, arch, widths, checkpoint_sha256, capture_point, provenance):
    """The plan-file dict (schema_version 1) of ``proposals`` made by ``criterion``."""
    fields = criterion.plan_fields()
    return {
        "schema_version": PLAN_SCHEMA_VERSION,
        "kind": PLAN_KIND,
        "model": {"arch": arch, "widths": widths, "checkpoint_sha256": checkpoint_sha256},
        "capture_point": capture_point,
        "threshold": fields["threshold"],
        "deadness_threshold": fields["deadness_threshold"],
        "score": fields["score"],
        "class_aware": fields["class_aware"],
        "min_class_samples": fields["min_class_samples"],
        "min_keep_ratio": fields["min_keep_ratio"],
        "round_to": fields["round_to"],
        **{k: fields[k] for k in ("ridge", "output_units") if k in fields},
        "layers": plan_layers(stats, proposals, fields["threshold"], fields["min_class_samples"]),
        "blocks": {name: {**entry, "prune": sorted(entry["prune"])} for name, entry in proposals.items()},
        "provenance": provenance,
    }


def write_plan(path, plan):
    """Write the plan file atomically (indent 2; the same plan always gives the same bytes)."""
    return write_json(path, plan)


# --- validating a plan file -------------------------------------------------------------------------------

_TOP = (
    ("schema_version", "int"),
    ("kind", "str"),
    ("model", "dict"),
    ("capture_point", "str"),
    ("threshold", "number"),
    ("deadness_threshold", "number"),
    ("score", "str"),
    ("class_aware", "bool"),
    ("min_class_samples", "int"),
    ("min_keep_ratio", "number"),
    ("round_to", "int"),
    ("layers", "dict"),
    ("blocks", "dict"),
    ("provenance", "dict"),
)
_MAX_CHANNELS = 2**31 - 1
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
        raise _bad(
            path, at, f"must be {kind.rstrip('?')}{' or null' if kind.endswith('?') else ''}, not {_short(obj[key])}"
        )
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
        raise _bad(
            path, f"blocks.{name}.hidden_channels", f"is {hidden}, but the model's block has {roles['hidden_channels']}"
        )


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
        raise _bad(
            path,
            where,
            f"keeps {kept} of {hidden} channels, below the floor of {floor} "
            f"({FLOOR} channels and min_keep_ratio {plan['min_keep_ratio']})",
        )
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
        raise _bad(
            path,
            f"model.widths.{layer}",
            f"is {_short(plan['model']['widths'].get(layer))}, but the model has {_short(widths.get(layer))}",
        )
    return plan


def check_plan_matches_model(plan, arch, widths, checkpoint_sha256, name="pruning plan"):
    """PruneError when the plan was made for another arch or widths; a warning string when only the sha256 differs."""
    model = plan["model"]
    if model["arch"] != arch:
        raise PruneError(f"{name} was made for {model['arch']}, but the model is {arch}")
    layer = first_width_difference(model["widths"], widths)
    if layer is not None:
        raise PruneError(
            f"{name} was made for a model whose layer {layer} has widths "
            f"{model['widths'].get(layer)}, but this model's {layer} has {widths.get(layer)}"
        )
    if model.get("checkpoint_sha256") != checkpoint_sha256:
        return (
            f"{name} was made from checkpoint sha256 {str(model.get('checkpoint_sha256'))[:12]}..., not "
            f"{str(checkpoint_sha256)[:12]}...: same architecture and widths, so it still applies"
        )
    return None
