"""Score every channel (obs by default: the joint, refit-aware choice), draw the deadness grids, write the plan.

Reads:  RUN_DIR/activation_stats.pt/.json (captured again only when missing or measured on another
        checkpoint, sample, capture point or image size), CHECKPOINT (default RUN_DIR/baseline.pt).
Writes: RUN_DIR/pruning_plan_<PLAN_TAG>.json (see README, "The plan file": the model it was measured on,
        capture point, thresholds, per-layer channel deadness with per-class min and max, per-block `prune`
        indices and kept count; meant to be edited by hand), RUN_DIR/deadness/<layer>_deadness_grid.png
        (one small H x W heat map per channel, brighter = more often inactive), RUN_DIR/deadness_histogram.png.
With SCORE=obs a block's channels are proposed in their greedy optimal-brain-surgeon order while the block
output's relative error stays below THRESHOLD; with SCORE=deadness (the original scripts' criterion) a
channel is proposed when its deadness (fraction of |a| < THRESHOLD) exceeds DEADNESS_THRESHOLD; every
block keeps at least MIN_KEEP_RATIO of its channels and 8, rounded up to a multiple of ROUND_TO. With
CLASS_AWARE=True a channel alive for any class with at least MIN_CLASS_SAMPLES images is spared. A new
THRESHOLD or DEADNESS_THRESHOLD re-plans from the saved statistics in seconds. Under torchrun a capture it
needs is shared by the processes (see visualize_neuron_activations.py); rank 0 alone plans and writes.

    python visualize_channel_activation.py --RUN_DIR=runs/demo --DEADNESS_THRESHOLD=0.8 --PLAN_TAG=d08
"""

import os
import time

import torch

from mbv3prune import config, distributed, measure, models, plan, plots, stage
from mbv3prune.activation_stats import ActivationStats, snap_threshold
from mbv3prune.artifacts import provenance, record_timings, sha256_file
from mbv3prune.blocks import check_capture_point, find_blocks
from mbv3prune.capture import DEFAULT_THRESHOLD
from mbv3prune.criterion import Criterion
from mbv3prune.errors import PruneError
from mbv3prune.prune import count_macs_params, macs_per_channel

# -----------------------------------------------------------------------------
DATA_DIR = "data/synthetic-species"  # data set whose train split is sampled (when a capture is needed)
RUN_DIR = "runs/demo"  # where every stage reads and writes its artifacts
MODEL_ARCH = "mobilenet_v3_large"  # mobilenet_v3_large or mobilenet_v3_small (must match the checkpoint)
CHECKPOINT = ""  # model the plan is for ("" = RUN_DIR/baseline.pt)
ALLOW_PICKLE = False  # allow CHECKPOINT to be a whole-model pickle (runs code from the file: only if you trust it)
SAMPLES_PER_CLASS = 32  # images drawn per class (a smaller class gives all it has)
SAMPLE_FRACTION = 0.0  # if > 0: a stratified fraction of the train split instead of SAMPLES_PER_CLASS
CAPTURE_POINT = "project_input"  # project_input (what the project conv consumes), activation or conv_output
THRESHOLD = DEFAULT_THRESHOLD  # |a| below this counts as inactive (other values: read from the histograms)
DEADNESS_THRESHOLD = 0.9  # a channel inactive more often than this is proposed for pruning
SCORE = "obs"  # obs, fluctuation, contribution, mean_abs or deadness (the original scripts'): mbv3prune/scores.py
CLASS_AWARE = False  # spare a channel that is alive for any class with >= MIN_CLASS_SAMPLES images
MIN_CLASS_SAMPLES = 5  # classes with fewer sampled images do not count for CLASS_AWARE
MIN_KEEP_RATIO = 0.25  # every block keeps at least this fraction of its hidden channels (and at least 8)
ROUND_TO = 8  # kept hidden channels are rounded up to a multiple of this
SKIP_BLOCKS = []  # blocks never proposed, e.g. ["features.15"]
PLAN_TAG = "default"  # the plan is written to RUN_DIR/pruning_plan_<PLAN_TAG>.json
GRIDS = True  # draw the per-layer deadness grids
RECAPTURE = False  # capture again even when saved statistics fit
SECOND_MOMENTS = True  # also stream the project-input covariances (SCORE=obs and RECONSTRUCT need them; ~50 MB, Large)
COV_POSITIONS_PER_IMAGE = 4  # positions per image the project-input covariances are estimated on (0 = all)
HIST_POSITIONS_PER_IMAGE = 4  # positions per image the |a| histograms count (0 = all; counts below THRESHOLD: all)
RESUME = False  # continue an interrupted capture from RUN_DIR/activation_stats.partial.pt
SAVE_EVERY = 50  # batches between partial saves (0 = never)
PER_CLASS = "auto"  # per class: auto (histograms while they fit MAX_STATS_MEMORY_GB), histograms, counts or off
MAX_STATS_MEMORY_GB = 4.0  # PER_CLASS=auto keeps per-class histograms only while they take at most this
IMAGE_SIZE = 64  # input resolution
BATCH_SIZE = 64  # images per batch
NUM_WORKERS = 2  # data-loading worker processes
DEVICE = "auto"  # auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps
SEED = 0  # seeds the sample
DEBUG = False  # show tracebacks of the project's errors
# -----------------------------------------------------------------------------


def check_config(cfg):
    check_capture_point(cfg["CAPTURE_POINT"])
    criterion = Criterion.from_config(cfg)  # checks the score, thresholds, floors and rounding
    if criterion.score == "obs" and not cfg["SECOND_MOMENTS"]:
        raise PruneError("SCORE=obs needs the project-input covariances: set SECOND_MOMENTS=True (it is False)")
    if not all(isinstance(c, str) and c.replace("-", "").replace("_", "").isalnum() for c in [cfg["PLAN_TAG"]]):
        raise PruneError(f"PLAN_TAG={cfg['PLAN_TAG']!r} must be a plain name (letters, digits, - and _)")
    return criterion


def figures(cfg, stats, layers, plan_dict):
    """Deadness grids per proposal layer and the deadness histogram; returns the paths."""
    wrote, captured = [], stats.threshold
    if cfg["GRIDS"]:
        for layer in plan_dict["layers"]:
            grid = stats.neuron_deadness(layer)
            title = f"{layer} ({layers[layer]['block']}): deadness per neuron at |a| < {captured:.3g}"
            path = os.path.join(cfg["RUN_DIR"], "deadness", f"{layer.replace('.', '_')}_deadness_grid.png")
            wrote.append(plots.deadness_grid(grid.numpy(), title, path))
    per_layer = {
        f"{layers[layer]['block']}": [v for v in d["channel_deadness"] if v is not None]
        for layer, d in plan_dict["layers"].items()
    }
    wrote.append(
        plots.deadness_histogram(
            per_layer, cfg["DEADNESS_THRESHOLD"], os.path.join(cfg["RUN_DIR"], "deadness_histogram.png")
        )
    )
    return wrote


def warn_snapped(threshold, stats):
    """Say so when THRESHOLD is neither a histogram edge nor the captured threshold (deadness is read lower)."""
    snapped = snap_threshold(threshold, stats.edges)
    if abs(snapped - threshold) > 1e-12 * threshold and abs(threshold - stats.threshold) > 1e-12 * threshold:
        print(f"THRESHOLD={threshold} is not a histogram edge: deadness is read at {snapped:.4g}")


def block_rows(plan_dict, per_channel, total):
    rows = []
    for name, b in plan_dict["blocks"].items():
        layer = b.get("layer")
        dead = torch.tensor(
            [v for v in plan_dict["layers"].get(layer, {}).get("channel_deadness", []) if v is not None],
            dtype=torch.float64,
        )
        q = [f"{float(torch.quantile(dead, p)):.2f}" if len(dead) else "-" for p in (0.05, 0.5, 0.95)]
        rows.append(
            [
                name,
                b["hidden_channels"],
                *q,
                b["candidates"],
                b["kept"],
                len(b["prune"]),
                f"{100 * len(b['prune']) * per_channel.get(name, 0) / total:.1f}%",
                b.get("skipped", ""),
            ]
        )
    return rows


def main(cfg):
    t0 = time.perf_counter()
    criterion = check_config(cfg)
    device = distributed.setup(cfg["DEVICE"])
    checkpoint = config.path_or_default(cfg, "CHECKPOINT", "baseline.pt")
    model, meta = models.load_checkpoint(checkpoint, cfg["MODEL_ARCH"], cfg["ALLOW_PICKLE"])
    cfg, splits, class_names = stage.checkpoint_data(cfg, meta)
    blocks, widths = find_blocks(model), models.layer_widths(model)
    stats, stats_meta, wrote = measure.ensure_stats(
        cfg,
        models.to_device(model, device),
        blocks,
        splits,
        class_names,
        checkpoint,
        widths,
        device,
        force=cfg["RECAPTURE"],
    )
    if not distributed.is_main():
        return  # the other processes only helped capture
    stats, layers = ActivationStats(stats), stats_meta["layers"]
    warn_snapped(cfg["THRESHOLD"], stats)
    proposals = criterion.propose(stats, blocks, layers, model)
    plan_dict = plan.make_plan(
        proposals,
        stats,
        criterion,
        arch=meta["arch"],
        widths=widths,
        checkpoint_sha256=sha256_file(checkpoint),
        capture_point=cfg["CAPTURE_POINT"],
        provenance=provenance(cfg, {"checkpoint": checkpoint}),
    )
    plan_path = plan.write_plan(os.path.join(cfg["RUN_DIR"], f"pruning_plan_{cfg['PLAN_TAG']}.json"), plan_dict)
    wrote = [plan_path] + wrote + figures(cfg, stats, layers, plan_dict)
    total, _ = count_macs_params(model, cfg["IMAGE_SIZE"])
    per_channel = macs_per_channel(model, blocks, cfg["IMAGE_SIZE"])
    rows = block_rows(plan_dict, per_channel, total)
    record_timings(cfg["RUN_DIR"], "visualize_channel_activation", {"seconds": time.perf_counter() - t0})
    print(
        stage.table(
            rows, ["block", "hidden", "dead p5", "p50", "p95", "candidates", "kept", "prune", "MACs", "skipped"]
        )
    )
    removed = sum(len(b["prune"]) * per_channel.get(n, 0) for n, b in plan_dict["blocks"].items())
    print(
        f"\nplan: {sum(r[7] for r in rows)} channels, {100 * removed / total:.1f}% of MACs "
        f"({cfg['SCORE']}, THRESHOLD={cfg['THRESHOLD']:.4g}, DEADNESS_THRESHOLD={cfg['DEADNESS_THRESHOLD']}"
        f"{', class-aware' if cfg['CLASS_AWARE'] else ''})"
    )
    grids = [p for p in wrote if p.endswith("_grid.png")]
    stage.finish(
        [p for p in wrote if not p.endswith("_grid.png")]
        + ([f"{os.path.dirname(grids[0])}/ ({len(grids)} deadness grids)"] if grids else []),
        f"python experiment_activation_based_block_pruning.py --RUN_DIR={cfg['RUN_DIR']} --PLAN={plan_path}",
    )


if __name__ == "__main__":
    config.run(main, globals())
