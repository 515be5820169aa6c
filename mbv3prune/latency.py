"""The latency table and the selection it drives: which chunks of hidden channels buy the most time.

The table holds, per prunable block (one with an expand conv), the measured time of that block ALONE at
each hidden width of its ``ROUND_TO`` grid (full width, then every multiple of ``ROUND_TO`` down to the
block's floor ``plan.min_kept``), on its real input shape at ``IMAGE_SIZE``, in the runtime the model will
run in (onnxruntime or eager PyTorch) at one batch size; plus the whole unpruned model's time, the
denominator of a latency reduction. Each narrowed block is cut from a copy of the model by
``prune.prune_blocks`` (the last channels go: latency does not depend on which), and the widths of one
block are timed round-robin (``timing.interleaved_ms``) so drift does not pass for a width effect. The
table is cached as JSON in ``RUN_DIR`` with what it was measured on and is re-used only when all of that
matches.

Width-to-latency is not monotone (kernels are picked per shape): ``latency_steps`` merges a chunk that saves
no time with the block's next chunk, and ``to_latency_target`` ranks the resulting steps globally.
"""

import copy
import dataclasses
import heapq
import json
import os
import platform
import tempfile
from contextlib import contextmanager

import torch
from tqdm import tqdm

from . import onnx_export
from .artifacts import read_json, versions, write_json
from .blocks import prunable
from .errors import PruneError
from .models import layer_widths
from .prune import prune_blocks
from .selection import min_kept
from .timing import eager_call, interleaved_ms, synchronizer

KIND = "mbv3prune-latency-table"
RUNTIMES = ("onnxruntime", "eager")
SCORE_KINDS = ("prunability", "cost", "removal")


@dataclasses.dataclass(frozen=True)
class TableSpec:
    """What a latency table is measured on, and how."""

    device: str = "cpu"  # where the blocks run: cpu, cuda, cuda:N
    runtime: str = "onnxruntime"  # onnxruntime or eager
    batch_size: int = 1
    image_size: int = 128  # the model's input resolution; each block gets its real input shape at it
    min_keep_ratio: float = 0.25  # the blocks' floors (plan.min_kept), as in the selection
    round_to: int = 8  # the width grid's step, as in the selection
    repeats: int = 50  # timed rounds (median reported)
    warmup: int = 10  # untimed rounds first

    def __post_init__(self):
        if self.runtime not in RUNTIMES:
            raise PruneError(f"unknown LATENCY_RUNTIME {self.runtime!r}: use {' or '.join(RUNTIMES)}")
        if self.batch_size < 1 or self.round_to < 1:
            raise PruneError(
                f"latency table needs batch_size >= 1 and round_to >= 1, got {self.batch_size}, {self.round_to}"
            )


def width_grid(hidden, floor, round_to):
    """The widths a block can be pruned to, widest first: ``hidden``, then the multiples of ``round_to`` >= ``floor``.

    The same kept counts as ``selection.to_macs_target``'s chunks (first chunk ``hidden % round_to`` or
    ``round_to``, then ``round_to`` each).
    """
    top = (hidden - 1) // round_to * round_to
    return [hidden] + list(range(top, floor - 1, -round_to))


def _grids(blocks, spec):
    """{prunable block: width grid} (blocks with no width below full are left out)."""
    grids = {}
    for name, roles in blocks.items():
        if prunable(roles):
            grid = width_grid(
                roles["hidden_channels"], min_kept(roles["hidden_channels"], spec.min_keep_ratio), spec.round_to
            )
            if len(grid) > 1:
                grids[name] = grid
    return grids


@contextmanager
def _recording_inputs(model, names):
    """Pre-forward hooks filling {block: input shape without the batch}; always removed."""
    shapes = {}
    hooks = [
        model.get_submodule(n).register_forward_pre_hook(
            lambda _, args, n=n: shapes.__setitem__(n, tuple(args[0].shape[1:]))
        )
        for n in names
    ]
    try:
        yield shapes
    finally:
        for h in hooks:
            h.remove()


def block_input_shapes(model, names, image_size):
    """{block: (C, H, W)} of each named block's input when the model sees (3, image_size, image_size) images."""
    module = copy.deepcopy(model).cpu().eval()
    with _recording_inputs(module, names) as shapes, torch.inference_mode():
        module(torch.zeros(1, 3, image_size, image_size))
    return shapes


def table_identity(model, blocks, spec):
    """What a cached table must match to be re-used: device, runtime, batch, size, threads, grid, model widths."""
    device = torch.device(spec.device)
    runtime_version = versions()["torch"] if spec.runtime == "eager" else _onnxruntime_version()
    return json.loads(
        json.dumps(
            {
                "device": str(device),
                "device_name": torch.cuda.get_device_name(device)
                if device.type == "cuda"
                else (platform.processor() or platform.machine()),
                "runtime": spec.runtime,
                "runtime_version": runtime_version,
                "batch_size": spec.batch_size,
                "image_size": spec.image_size,
                "threads": torch.get_num_threads(),
                "min_keep_ratio": spec.min_keep_ratio,
                "round_to": spec.round_to,
                "blocks": sorted(_grids(blocks, spec)),
                "widths": layer_widths(model),
            }
        )
    )


def _onnxruntime_version():
    import onnxruntime

    return onnxruntime.__version__


def narrowed_blocks(model, blocks, spec):
    """{prunable block: {width: a standalone copy of the block cut to that width}} over each block's grid.

    Step k cuts every block that has a k-th width from one copy of the model (the blocks' channels are
    independent), so the model is copied and traced once per step, not once per width.
    """
    grids = _grids(blocks, spec)
    out = {name: {} for name in grids}
    for k in tqdm(range(max(map(len, grids.values()))), desc="narrowing blocks", leave=False):
        plan = {n: list(range(g[k], g[0])) for n, g in grids.items() if k < len(g)}
        probe = copy.deepcopy(model).cpu()
        prune_blocks(probe, blocks, plan, spec.image_size)
        for name in plan:
            out[name][grids[name][k]] = copy.deepcopy(probe.get_submodule(name)).eval()
    return out


def runtime_calls(modules, input_shape, spec, workdir, tag):
    """{key: call} timing each module on a (batch, *input_shape) input in the spec's runtime."""
    device = torch.device(spec.device)
    x = onnx_export.example_batch(input_shape, spec.batch_size, device=device)
    if spec.runtime == "eager":
        return {key: eager_call(m.to(device), x) for key, m in modules.items()}
    calls = {}
    for key, m in modules.items():
        path = os.path.join(workdir, f"{tag}_{key}.onnx")
        onnx_export.export_onnx(m, path, input_shape)
        calls[key] = onnx_export.session_call(onnx_export.session(path, device), x)
    return calls


def _time(modules, input_shape, spec, workdir, tag):
    """{key: median ms} of ``modules`` timed round-robin."""
    ms = interleaved_ms(
        runtime_calls(modules, input_shape, spec, workdir, tag), spec.repeats, spec.warmup, synchronizer(spec.device)
    )
    return {key: ms[key] for key in modules}


def build_table(model, blocks, spec):
    """Measure a latency table: {"kind", "identity", "spec", "model_ms", "blocks": {block: {"hidden",
    "input_shape", "ms": {width: ms}}}} (widths as ints, widest first)."""
    grids = _grids(blocks, spec)
    if not grids:
        raise PruneError("latency table: no block can lose a chunk of channels (all at their floor)")
    shapes = block_input_shapes(model, list(grids), spec.image_size)
    narrowed = narrowed_blocks(model, blocks, spec)
    table = {
        "kind": KIND,
        "identity": table_identity(model, blocks, spec),
        "spec": dataclasses.asdict(spec),
        "blocks": {},
    }
    with tempfile.TemporaryDirectory(prefix="latency_") as workdir:
        table["model_ms"] = _time(
            {"model": copy.deepcopy(model).eval()}, (3, spec.image_size, spec.image_size), spec, workdir, "model"
        )["model"]
        for name in tqdm(grids, desc=f"timing blocks ({spec.runtime})", leave=False):
            table["blocks"][name] = {
                "hidden": grids[name][0],
                "input_shape": list(shapes[name]),
                "ms": _time(narrowed.pop(name), shapes[name], spec, workdir, name),
            }
    return table


def _int_widths(table, path):
    """``table`` with its width keys as ints (JSON keeps them as strings)."""
    try:
        for entry in table["blocks"].values():
            entry["ms"] = {int(w): float(ms) for w, ms in entry["ms"].items()}
        float(table["model_ms"])
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise PruneError(
            f"latency table {path} is malformed ({type(err).__name__}: {err}): delete it to re-measure"
        ) from None
    return table


def load_or_build(path, model, blocks, spec):
    """(table, re-used): the table at ``path`` if measured on exactly this identity, else a fresh one written there."""
    if os.path.exists(path):
        cached = read_json(path, "latency table")
        if cached.get("kind") == KIND and cached.get("identity") == table_identity(model, blocks, spec):
            return _int_widths(cached, path), True
    table = build_table(model, blocks, spec)
    write_json(path, table)
    return table, False


def latency_steps(ms, hidden, floor, round_to, limit=None):
    """[(channels removed, ms saved)] a block's removals in order, from ``ms`` {width: measured ms}.

    The grid is ``width_grid``'s, cut where more than ``limit`` channels would go. A chunk that saves no
    time is merged with the block's next chunk (and the next, until the time drops); trailing chunks that
    never save time are left out.
    """
    grid = [w for w in width_grid(hidden, floor, round_to) if limit is None or hidden - w <= limit]
    missing = [w for w in grid if w not in ms]
    if missing:
        raise PruneError(
            f"latency table has no time for width {missing[0]} of a {hidden}-channel block: "
            "measured with another ROUND_TO or MIN_KEEP_RATIO? re-measure it"
        )
    steps, current = [], grid[0]
    for w in grid[1:]:
        if ms[w] < ms[current]:
            steps.append((current - w, ms[current] - ms[w]))
            current = w
    return steps


def _block_steps(ranked, saving_steps, kind):
    """[(heap key, channels)] of one block's steps: lower key first; channels best first as the ranking says."""
    if kind == "prunability":
        order = [c for _, c in sorted(ranked, key=lambda r: (-r[0], r[1]))]
    elif kind == "removal":  # costs of removing each channel next, in a greedy removal order (obs): keep it
        order = [c for _, c in ranked]
    else:
        order = [c for _, c in sorted(ranked, key=lambda r: (r[0], r[1]))]
    score = {c: s for s, c in ranked}
    out, start = [], 0
    for n, saved in saving_steps:
        chunk = order[start : start + n]
        start += n
        key = -min(score[c] for c in chunk) if kind == "prunability" else sum(score[c] for c in chunk) / saved
        out.append((key, chunk, saved))
    return out


def _table_block(table, name, hidden):
    entry = table["blocks"].get(name)
    if entry is None:
        raise PruneError(f"latency table has no block {name}: it was measured for other blocks; re-measure it")
    if entry["hidden"] != hidden:
        raise PruneError(
            f"latency table block {name} was measured at {entry['hidden']} channels, the model has "
            f"{hidden}: a table of another model; re-measure it"
        )
    return entry["ms"]


def to_latency_target(ranking, blocks, table, target, min_keep_ratio=0.25, round_to=8, kind="prunability"):
    """(selection {block: sorted indices}, predicted latency reduction): chunks taken until ``target`` is reached.

    ``ranking``: {block: [(score, channel), ...]} over the channels that may go. ``kind="prunability"``
    (higher = prune first): a step's score is its least prunable channel's, and steps are taken most
    prunable first, as ``selection.to_macs_target`` does. ``kind="cost"`` (a cost in block-output units,
    lower = prune first): a step's cost is the sum of its channels' costs, and steps are taken cheapest
    per millisecond saved first. A block's steps are taken in order; the reduction is a fraction of the
    table's whole-model time. Stops below target when nothing is left to take.
    """
    if not 0 < target < 1:
        raise PruneError(f"TARGET_LATENCY_REDUCTION={target} must lie in (0, 1)")
    if kind not in SCORE_KINDS:
        raise PruneError(f"unknown score kind {kind!r}: use {' or '.join(SCORE_KINDS)}")
    heap, steps = [], {}
    for order, (name, ranked) in enumerate(ranking.items()):
        hidden = blocks[name]["hidden_channels"]
        floor = min_kept(hidden, min_keep_ratio)
        if len(width_grid(hidden, floor, round_to)) == 1:
            continue  # at its floor already: nothing to take, and the table has no entry for it
        saving = latency_steps(_table_block(table, name, hidden), hidden, floor, round_to, limit=len(ranked))
        steps[name] = _block_steps(ranked, saving, kind)
        if steps[name]:
            heapq.heappush(heap, (steps[name][0][0], order, name, 0))
    selection, saved, goal = {}, 0.0, target * table["model_ms"]
    while heap and saved < goal:
        _, order, name, i = heapq.heappop(heap)
        _, chunk, ms = steps[name][i]
        selection.setdefault(name, []).extend(chunk)
        saved += ms
        if i + 1 < len(steps[name]):
            heapq.heappush(heap, (steps[name][i + 1][0], order, name, i + 1))
    return {k: sorted(v) for k, v in selection.items()}, saved / table["model_ms"]
