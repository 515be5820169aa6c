"""Capture activations on a stratified sample (running totals only) and plot their magnitude distributions.

Reads:  CHECKPOINT (default RUN_DIR/baseline.pt), DATA_DIR (its train split is sampled: SAMPLES_PER_CLASS
        images per class, or a stratified SAMPLE_FRACTION; every class is covered).
Writes: RUN_DIR/activation_stats.pt (per layer and channel: counts below THRESHOLD, per-neuron counts, sums,
        max, |a| histograms overall and per class on HIST_POSITIONS_PER_IMAGE positions drawn per image;
        plain tensors, weights_only-loadable),
        RUN_DIR/activation_stats.json (the sample's files, capture point, threshold, checkpoint sha256),
        RUN_DIR/activation_summary.json (per-layer percentiles of |a| and suggested thresholds),
        RUN_DIR/activations/<layer>_hist.png (|a| distribution, log x, THRESHOLD and suggestions marked),
        RUN_DIR/threshold_sensitivity.png (deadness against the threshold, a curve per layer).
Memory does not grow with the number of images: no feature map outlives its batch. A capture interrupted
with RESUME=True continues from its last partial save. Saved statistics are re-used when they were
measured on the same checkpoint, sample, capture point and image size (RECAPTURE=True forces a new pass).
Under torchrun each process (GPU) captures its own shard of the sample and the totals are added across
processes (the same statistics as one process; with COV_POSITIONS_PER_IMAGE or HIST_POSITIONS_PER_IMAGE > 0
the project-input covariance or the histograms are random estimates, and several processes or a resumed
capture draw other positions: 0 reproduces them exactly); rank 0 alone writes and prints. Partial saves
and RESUME need one process.

    python visualize_neuron_activations.py --RUN_DIR=runs/demo --SAMPLES_PER_CLASS=32
    torchrun --nproc_per_node=4 visualize_neuron_activations.py --RUN_DIR=runs/demo --SAMPLES_PER_CLASS=256
"""

import os
import time

from mbv3prune import config, distributed, measure, models, plots, stage
from mbv3prune.activation_stats import ActivationStats, check_threshold
from mbv3prune.artifacts import provenance, record_timings, write_json
from mbv3prune.blocks import check_capture_point, find_blocks
from mbv3prune.capture import DEFAULT_THRESHOLD
from mbv3prune.errors import PruneError
from mbv3prune.histograms import layer_counts, percentiles, sensitivity, suggest, thresholds_axis

# -----------------------------------------------------------------------------
DATA_DIR = "data/synthetic-species"  # data set whose train split is sampled
RUN_DIR = "runs/demo"  # where every stage reads and writes its artifacts
MODEL_ARCH = "mobilenet_v3_large"  # mobilenet_v3_large or mobilenet_v3_small (must match the checkpoint)
CHECKPOINT = ""  # model to measure ("" = RUN_DIR/baseline.pt)
ALLOW_PICKLE = False  # allow CHECKPOINT to be a whole-model pickle (runs code from the file: only if you trust it)
SAMPLES_PER_CLASS = 32  # images drawn per class (a smaller class gives all it has)
SAMPLE_FRACTION = 0.0  # if > 0: a stratified fraction of the train split instead of SAMPLES_PER_CLASS
CAPTURE_POINT = "project_input"  # project_input (what the project conv consumes), activation or conv_output
THRESHOLD = DEFAULT_THRESHOLD  # |a| below this counts as inactive (2**-7, a histogram bin edge)
DEADNESS_THRESHOLD = 0.9  # for the sensitivity figure: a channel inactive more often than this is dead
RECAPTURE = False  # capture again even when saved statistics fit
SECOND_MOMENTS = True  # also stream the project-input covariances (SCORE=obs and RECONSTRUCT need them; ~50 MB, Large)
COV_POSITIONS_PER_IMAGE = 4  # positions per image the project-input covariances are estimated on (0 = all)
HIST_POSITIONS_PER_IMAGE = 4  # positions per image the |a| histograms count (0 = all; counts below THRESHOLD: all)
RESUME = False  # continue an interrupted capture from RUN_DIR/activation_stats.partial.pt (one process only)
SAVE_EVERY = 50  # batches between partial saves (0 = never; off under torchrun with several processes)
PER_CLASS = "auto"  # per class: auto (histograms while they fit MAX_STATS_MEMORY_GB), histograms, counts or off
MAX_STATS_MEMORY_GB = 4.0  # PER_CLASS=auto keeps per-class histograms only while they take at most this
IMAGE_SIZE = 64  # input resolution
BATCH_SIZE = 64  # images per batch (per process under torchrun)
NUM_WORKERS = 2  # data-loading worker processes
DEVICE = "auto"  # auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps
SEED = 0  # seeds the sample
DEBUG = False  # show tracebacks of the project's errors
# -----------------------------------------------------------------------------


def check_config(cfg):
    check_capture_point(cfg["CAPTURE_POINT"])
    check_threshold(cfg["THRESHOLD"])
    if not 0 <= cfg["DEADNESS_THRESHOLD"] < 1:
        raise PruneError(f"DEADNESS_THRESHOLD={cfg['DEADNESS_THRESHOLD']} must lie in [0, 1)")
    if cfg["SAMPLES_PER_CLASS"] < 1 and not cfg["SAMPLE_FRACTION"]:
        raise PruneError(f"SAMPLES_PER_CLASS={cfg['SAMPLES_PER_CLASS']} must be at least 1")


def figures(cfg, stats, layers, edges, suggestions, global_suggestion):
    """One |a| histogram per layer and the threshold-sensitivity figure; returns the paths."""
    wrote = []
    for layer, info in layers.items():
        title = f"{layer} ({info['role']} of {info['block']}, {info['channels']} ch, {cfg['CAPTURE_POINT']})"
        path = os.path.join(cfg["RUN_DIR"], "activations", f"{layer.replace('.', '_')}_hist.png")
        marks = {
            "5th percentile": suggestions[layer]["p5"],
            "1% of median": suggestions[layer]["one_percent_of_median"],
        }
        wrote.append(plots.magnitude_histogram(layer_counts(stats, layer), edges, title, cfg["THRESHOLD"], marks, path))
    curves = {layer: sensitivity(stats, layer, edges, cfg["DEADNESS_THRESHOLD"]) for layer in layers}
    wrote.append(
        plots.threshold_sensitivity(
            thresholds_axis(edges),
            curves,
            cfg["THRESHOLD"],
            cfg["DEADNESS_THRESHOLD"],
            os.path.join(cfg["RUN_DIR"], "threshold_sensitivity.png"),
        )
    )
    return wrote


def main(cfg):
    t0 = time.perf_counter()
    check_config(cfg)
    device = distributed.setup(cfg["DEVICE"])
    checkpoint = config.path_or_default(cfg, "CHECKPOINT", "baseline.pt")
    model, meta = models.load_checkpoint(checkpoint, cfg["MODEL_ARCH"], cfg["ALLOW_PICKLE"])
    cfg, splits, class_names = stage.checkpoint_data(cfg, meta)
    stats, stats_meta, wrote = measure.ensure_stats(
        cfg,
        models.to_device(model, device),
        find_blocks(model),
        splits,
        class_names,
        checkpoint,
        models.layer_widths(model),
        device,
        force=cfg["RECAPTURE"],
    )
    if not distributed.is_main():
        return  # the other processes only helped capture
    t_capture = time.perf_counter() - t0
    layers, edges = stats_meta["layers"], ActivationStats(stats).edges
    suggestions, global_suggestion = suggest(stats, layers, edges)
    table = {layer: {f"p{p}": v for p, v in percentiles(layer_counts(stats, layer), edges).items()} for layer in layers}
    summary = {
        "schema_version": 1,
        "kind": "mbv3prune-activation-summary",
        "capture_point": cfg["CAPTURE_POINT"],
        "threshold": cfg["THRESHOLD"],
        "percentiles": table,
        "suggested": suggestions,
        "suggested_global_threshold": global_suggestion,
        "provenance": provenance(cfg),
    }
    wrote.append(write_json(os.path.join(cfg["RUN_DIR"], "activation_summary.json"), summary))
    wrote += figures(cfg, stats, layers, edges, suggestions, global_suggestion)
    record_timings(
        cfg["RUN_DIR"],
        "visualize_neuron_activations",
        {"seconds": time.perf_counter() - t0, "capture_seconds": t_capture},
    )
    rows = [
        [layer, *(f"{v:.3g}" for v in table[layer].values()), f"{suggestions[layer]['one_percent_of_median']:.3g}"]
        for layer in layers
    ]
    print(stage.table(rows, ["layer", *table[next(iter(layers))].keys(), "1% of median"]))
    print(
        f"\n|a| percentiles per layer ({stats_meta['sample']['images']} images, {cfg['CAPTURE_POINT']}); "
        f"THRESHOLD={cfg['THRESHOLD']:.4g}, suggested (median over layers of 1% of the median): {global_suggestion:.3g}"
    )
    shown = [p for p in wrote if not p.endswith("_hist.png")]
    stage.finish(
        shown + [f"{os.path.join(cfg['RUN_DIR'], 'activations')}/ ({len(layers)} histograms)"],
        f"python visualize_channel_activation.py --RUN_DIR={cfg['RUN_DIR']}",
    )


if __name__ == "__main__":
    config.run(main, globals())
