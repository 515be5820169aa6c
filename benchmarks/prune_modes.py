"""One-shot threshold pruning against iterative re-scoring, with and without compensation, for each SCORE.

Reads:  RUN_DIR/baseline.pt and RUN_DIR/activation_stats.pt/.json (what `make flowers` writes).
Writes: RUN_DIR/prune_modes.json (per configuration: MACs and params removed, channels spared because they
        came alive, top-1 with a 95% bootstrap interval with no recovery, after BN recalibration and after
        FINETUNE_EPOCHS of fine-tuning) and examples/prune_modes.md (the table the README includes).
Each SCORE is cut at its own threshold (SETTINGS): `threshold` prunes the plan's candidates of the one
measurement on the unpruned model; `iterative` prunes block by block in forward order and re-measures the
downstream blocks (same stratified sample) after each, pruning only channels that are candidates in both
the first and the latest measurement. COMPENSATION: none, mean (fold the removed channels' mean into the
project BN and SE fc1: the project's default), mean_var (also lower the project BN's running variance).
Results are saved after every configuration; an interrupted run continues where it stopped.

    python -m benchmarks.prune_modes
"""

import time

from tqdm import tqdm

from mbv3prune import bench, config, iterative, measure, stage
from mbv3prune.artifacts import provenance, sha256_file, write_json, write_text
from mbv3prune.compensate import folder
from mbv3prune.criterion import Criterion
from mbv3prune.errors import PruneError
from mbv3prune.scores import check_score
from mbv3prune.train import seed_everything

# -----------------------------------------------------------------------------
DATA_DIR = "../shared/data/oxford-flowers12"  # the data set the baseline was trained on (train/ + test/)
RUN_DIR = "runs/flowers"  # baseline.pt and activation_stats.pt of `make flowers`
OUT = ""  # results JSON ("" = RUN_DIR/prune_modes.json)
TABLE = "examples/prune_modes.md"  # the Markdown table (the README includes it)
MODEL_ARCH = "mobilenet_v3_large"  # must match the checkpoint
IMAGE_SIZE = 128  # resolution the baseline was trained and the statistics captured at
SETTINGS = {
    "deadness": {"threshold": 2**-7, "deadness_threshold": 0.5},
    "mean_abs": {"threshold": 0.1},
    "contribution": {"threshold": 0.1},
    "fluctuation": {"threshold": 0.15},
}  # per SCORE its cut: each removes 10-20% of MACs on the flowers
MODES = ["threshold", "iterative"]  # one-shot plan, or block-by-block with re-measurement
COMPENSATION = ["none", "mean", "mean_var"]  # compensation variants compared
FINETUNE_COMPENSATION = ["none", "mean"]  # variants that are also fine-tuned (~1 min per epoch and run)
FINETUNE_EPOCHS = 1  # the short fine-tune (train_model.py's recipe)
FINETUNE_LR = 5e-4  # peak learning rate of the fine-tuning
BN_BATCHES = 20  # training batches for BN recalibration
MIN_KEEP_RATIO = 0.25  # every block keeps at least this fraction of its hidden channels (and at least 8)
ROUND_TO = 8  # kept hidden channels are a multiple of this
BATCH_SIZE = 64  # images per batch
NUM_WORKERS = 2  # data-loading worker processes
DEVICE = "auto"  # auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps
SEED = 0  # seeds fine-tuning and data order
DEBUG = False  # show tracebacks of the project's errors
# -----------------------------------------------------------------------------
VARIANTS = {"none": None, "mean": False, "mean_var": True}  # compensation -> correct_variance (None: off)


def check_config(cfg):
    for score in cfg["SETTINGS"]:
        check_score(score)
    for name in cfg["COMPENSATION"] + cfg["FINETUNE_COMPENSATION"]:
        if name not in VARIANTS:
            raise PruneError(f"unknown compensation {name!r} in COMPENSATION: use one of {', '.join(VARIANTS)}")
    if any(m not in ("threshold", "iterative") for m in cfg["MODES"]):
        raise PruneError(f"MODES={cfg['MODES']}: use threshold and/or iterative")


def cut(cfg, score):
    s = cfg["SETTINGS"][score]
    return s["threshold"], s.get("deadness_threshold", 0.9)


def compensator(run, variant):
    if VARIANTS[variant] is None:
        return None
    return folder(run.capture_point, VARIANTS[variant])


def criterion(cfg, score):
    """The criterion of ``score`` at the benchmark's cut, floors and rounding."""
    threshold, deadness_threshold = cut(cfg, score)
    return Criterion(score, threshold, deadness_threshold, cfg["MIN_KEEP_RATIO"], cfg["ROUND_TO"])


def threshold_selection(run, cfg, score):
    proposals = criterion(cfg, score).propose(run.stats, run.blocks, run.layers, run.model)
    return {b: e["prune"] for b, e in proposals.items() if e["prune"]}


def iterative_model(run, cfg, score, variant):
    """(pruned model, selection, per-round log) of PRUNE_MODE=iterative on the capture's own sample."""
    loader = stage.loader(cfg, measure.sample_items(run.stats_meta, cfg["DATA_DIR"]))
    pruned, rounds, chosen, _ = iterative.run_loaded(
        run,
        loader,
        criterion(cfg, score),
        iterative.Schedule(max_rounds=len(run.blocks)),
        compensator(run, variant),
        log=lambda *_: None,
    )
    return pruned, chosen, rounds


def one_config(run, cfg, score, mode, variant):
    step_cfg = {
        **cfg,
        "BN_RECALIBRATE": True,
        "FINETUNE_EPOCHS": cfg["FINETUNE_EPOCHS"] if variant in cfg["FINETUNE_COMPENSATION"] else 0,
    }
    if mode == "threshold":
        chosen = threshold_selection(run, cfg, score)
        record = bench.prune_and_score(run, chosen, step_cfg, compensator(run, variant))
        return {**record, "removed_channels": sum(map(len, chosen.values()))}
    model, chosen, rounds = iterative_model(run, cfg, score, variant)
    record = bench.prune_and_score(run, chosen, step_cfg, model=model)
    spared = sum(len(v) for r in rounds for v in r["spared_came_alive"].values())
    return {
        **record,
        "removed_channels": sum(map(len, chosen.values())),
        "rounds": len(rounds),
        "spared_came_alive": spared,
    }


def main(cfg):
    t0 = time.perf_counter()
    check_config(cfg)
    seed_everything(cfg["SEED"])
    out = config.path_or_default(cfg, "OUT", "prune_modes.json")
    run = bench.load_run(cfg)
    identity = {
        "checkpoint_sha256": sha256_file(run.checkpoint),
        **{
            k: cfg[k]
            for k in (
                "DATA_DIR",
                "SETTINGS",
                "FINETUNE_EPOCHS",
                "FINETUNE_COMPENSATION",
                "FINETUNE_LR",
                "BN_BATCHES",
                "MIN_KEEP_RATIO",
                "ROUND_TO",
                "IMAGE_SIZE",
                "BATCH_SIZE",
                "SEED",
            )
        },
    }
    results, earlier = bench.resume(out, identity, "prune modes")
    record = {
        "schema_version": 1,
        "kind": "mbv3prune-prune-modes",
        "identity": identity,
        "results": results,
        "provenance": provenance(cfg, {"checkpoint": run.checkpoint}),
    }
    if "baseline" not in results:
        results["baseline"] = bench.with_intervals({"baseline": bench.score_baseline(run)})["baseline"]
    todo = [
        (s, m, v)
        for s in cfg["SETTINGS"]
        for m in cfg["MODES"]
        for v in cfg["COMPENSATION"]
        if f"{s}/{m}/{v}" not in results
    ]
    for score, mode, variant in tqdm(todo, desc="modes", disable=None):
        results[f"{score}/{mode}/{variant}"] = one_config(run, cfg, score, mode, variant)
        write_json(out, record)
    record["seconds"] = round(earlier + time.perf_counter() - t0, 1)  # over every run that added results
    write_json(out, record)
    text = markdown(cfg, results)
    print(text)
    stage.finish([out, cfg["TABLE"]])


def markdown(cfg, results):
    base = results["baseline"]
    lines = [
        f"Baseline top-1 {100 * base['top1']:.1f}% on {len(base['correct'])} test photos; top-1 % with a 95% "
        f"bootstrap interval; fine-tuned: {cfg['FINETUNE_EPOCHS']} epoch(s).",
        "",
        "| score (cut) | mode | compensation | MACs removed | channels removed (spared) | no FT | "
        "BN recalibrated | fine-tuned |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key, r in results.items():
        if key == "baseline":
            continue
        score, mode, variant = key.split("/")
        threshold, deadness_threshold = cut(cfg, score)
        what = f"deadness > {deadness_threshold} at {threshold:.3g}" if score == "deadness" else f"< {threshold:g}"
        spared = f" ({r['spared_came_alive']})" if "spared_came_alive" in r else ""
        lines.append(
            f"| {score} ({what}) | {mode} | {variant} | {100 * r['macs_reduction']:.1f}% | "
            f"{r['removed_channels']}{spared} | "
            + " | ".join(bench.cell(r, step) for step in ("pruned", "bn_recalibrated", "finetuned"))
            + " |"
        )
    text = "\n".join(lines) + "\n"
    write_text(cfg["TABLE"], text)
    return text


if __name__ == "__main__":
    config.run(main, globals())
