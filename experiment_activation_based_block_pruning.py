"""Prune the hidden channels of every inverted-residual block with torch-pruning, then measure what it cost.

Reads:  CHECKPOINT (default RUN_DIR/baseline.pt), RUN_DIR/mobilenetv3_block_structure.json, the pruning plan
        PLAN (default RUN_DIR/pruning_plan_default.json) and, for PRUNE_MODE=target_macs and SWEEP, the
        activation statistics RUN_DIR/activation_stats.pt.
Writes: RUN_DIR/pruned.pt (loads with weights_only=True and rebuilds the pruned widths itself),
        RUN_DIR/pruning_report.json (per block before -> after, MACs, params, top-1 and per-class accuracy
        before and after, with no recovery, BN recalibration and fine-tuning; classes that lost > 10 points
        flagged), RUN_DIR/timings.json (latency and stage time), and with SWEEP RUN_DIR/pruning_sweep.json/.png.
Each block is pruned with ONE torch-pruning dependency group rooted at its expand conv's output channels:
it covers the BN, the depthwise conv, SE fc1 / fc2 and the project conv. Blocks without an expand conv are
skipped (their channels are tied to the stem and the residual path).
PRUNE_MODE: threshold (exactly the plan's per-block `prune` indices) or target_macs (rank every block's
channels by SCORE and prune the most prunable until MACs fall by TARGET_MACS_REDUCTION).

    python experiment_activation_based_block_pruning.py --RUN_DIR=runs/demo --PRUNE_MODE=target_macs
"""
import os
import time
import warnings

import torch

from mbv3prune import config, models, plots, selection, stage
from mbv3prune.artifacts import load_tensors, provenance, read_json, record_timings, sha256_file, write_json
from mbv3prune.blocks import find_blocks
from mbv3prune.capture import describe_layers
from mbv3prune.errors import PruneError
from mbv3prune.evaluate import file_size_mb, flag_class_drops
from mbv3prune.experiment import cost, make_loaders, prune_copy, recover, score
from mbv3prune.plan import check_plan_matches_model, check_score, load_plan, propose
from mbv3prune.prune import block_macs, count_macs_params, macs_per_channel
from mbv3prune.train import seed_everything

# -----------------------------------------------------------------------------
DATA_DIR = "data/synthetic-species"  # data set: train split for BN recalibration and fine-tuning, test/val to score
RUN_DIR = "runs/demo"  # where every stage reads and writes its artifacts
MODEL_ARCH = "mobilenet_v3_large"  # mobilenet_v3_large or mobilenet_v3_small (must match the checkpoint)
CHECKPOINT = ""  # model to prune ("" = RUN_DIR/baseline.pt)
ALLOW_PICKLE = False  # allow CHECKPOINT to be a whole-model pickle (runs code from the file: only if you trust it)
PLAN = ""  # pruning plan ("" = RUN_DIR/pruning_plan_default.json)
STATS = ""  # activation statistics for target_macs and SWEEP ("" = RUN_DIR/activation_stats.pt)
PRUNE_MODE = "threshold"  # threshold (the plan's indices) or target_macs (most prunable until the MACs target)
TARGET_MACS_REDUCTION = 0.2  # target_macs: fraction of the model's MACs to remove
FALLBACK_TARGET = 0.0  # threshold mode: when the plan removes < 10% of MACs, prune to this MACs target instead (0 = no)
SCORE = ""  # target_macs ranking: deadness, mean_abs or contribution ("" = the plan's score)
CLASS_AWARE = False  # target_macs with deadness: rank a channel by its deadness in the class where it is most alive
SKIP_BLOCKS = []  # blocks never to touch, e.g. ["features.15"]
MIN_KEEP_RATIO = 0.25  # every block keeps at least this fraction of its hidden channels (and at least 8)
ROUND_TO = 8  # kept hidden channels are a multiple of this (target_macs; a plan off it gets a warning)
BN_RECALIBRATE = True  # re-estimate BN statistics on training batches after pruning (reported separately)
BN_BATCHES = 20  # training batches used to re-estimate BN statistics
FINETUNE_EPOCHS = 0  # fine-tuning epochs after pruning (train_model.py's recipe; 0 = none)
FINETUNE_LR = 5e-4  # peak learning rate of the fine-tuning
SWEEP = []  # thresholds (threshold mode: DEADNESS_THRESHOLD values) or MACs targets (target_macs) to compare
LATENCY = True  # measure latency at batch 1 and 32 (into timings.json)
IMAGE_SIZE = 64  # input resolution for MACs, latency and accuracy
BATCH_SIZE = 64  # images per batch
NUM_WORKERS = 2  # data-loading worker processes
DEVICE = "auto"  # auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps
SEED = 0  # seeds data order and fine-tuning
DEBUG = False  # show tracebacks of the project's errors
# -----------------------------------------------------------------------------
PRUNE_MODES = ("threshold", "target_macs")
MIN_USEFUL_REDUCTION = 0.10  # below this a plan is reported as not worth pruning


def check_config(cfg):
    if cfg["PRUNE_MODE"] not in PRUNE_MODES:
        raise PruneError(f"unknown PRUNE_MODE {cfg['PRUNE_MODE']!r}: use one of {', '.join(PRUNE_MODES)}")
    for name in ("TARGET_MACS_REDUCTION", "FALLBACK_TARGET"):
        if not 0 <= cfg[name] < 1:
            raise PruneError(f"{name}={cfg[name]} must lie in [0, 1)")
    if not 0 <= cfg["MIN_KEEP_RATIO"] <= 1:
        raise PruneError(f"MIN_KEEP_RATIO={cfg['MIN_KEEP_RATIO']} must lie in [0, 1]")
    if cfg["ROUND_TO"] < 1 or cfg["FINETUNE_EPOCHS"] < 0 or cfg["BN_BATCHES"] < 1:
        raise PruneError("ROUND_TO and BN_BATCHES must be >= 1, FINETUNE_EPOCHS >= 0")
    if cfg["SCORE"]:
        check_score(cfg["SCORE"])


def load_structure(path, model):
    """The block structure file, checked against the model it is applied to."""
    structure = read_json(path, "block structure")
    blocks = structure.get("blocks") if isinstance(structure, dict) else None
    if not isinstance(blocks, dict):
        raise PruneError(f"block structure {path} has no 'blocks' object: re-run mobilenetv3_features.py")
    actual = find_blocks(model)
    for name in list(actual) + [b for b in blocks if b not in actual]:
        if blocks.get(name) != actual.get(name):
            raise PruneError(f"block structure {path} describes another model: block {name} differs "
                             "(re-run mobilenetv3_features.py on this checkpoint)")
    return actual


def load_inputs(cfg):
    checkpoint = config.path_or_default(cfg, "CHECKPOINT", "baseline.pt")
    model, meta = models.load_checkpoint(checkpoint, cfg["MODEL_ARCH"], cfg["ALLOW_PICKLE"])
    blocks = load_structure(os.path.join(cfg["RUN_DIR"], "mobilenetv3_block_structure.json"), model)
    plan_path = config.path_or_default(cfg, "PLAN", "pruning_plan_default.json")
    plan = load_plan(plan_path, blocks, models.layer_widths(model))
    warning = check_plan_matches_model(plan, meta["arch"], models.layer_widths(model), sha256_file(checkpoint))
    if warning:
        warnings.warn(warning)
    return checkpoint, model, meta, blocks, plan_path, plan


def stats_ranking(cfg, plan, blocks, model, score_name):
    """Every channel's prunability from the saved activation statistics."""
    stats = load_tensors(config.path_or_default(cfg, "STATS", "activation_stats.pt"), "activation statistics")
    layers = describe_layers(blocks, plan["capture_point"])
    return selection.rank_channels(stats, blocks, layers, score_name, plan["threshold"], cfg["CLASS_AWARE"],
                                   plan.get("min_class_samples", 5), model, cfg["SKIP_BLOCKS"])


def choose(cfg, plan, blocks, model, per_channel, total, mode, target):
    """(selection, predicted MACs reduction, how it was chosen)."""
    if mode == "threshold":
        chosen = selection.from_plan(plan, blocks, cfg["SKIP_BLOCKS"], cfg["MIN_KEEP_RATIO"], cfg["ROUND_TO"])
        reduction = sum(len(v) * per_channel[b] for b, v in chosen.items()) / total
        return chosen, reduction, f"the plan's indices ({plan['score']} > {plan['deadness_threshold']})"
    score_name = cfg["SCORE"] or plan["score"]
    ranking = stats_ranking(cfg, plan, blocks, model, score_name)
    chosen, reduction = selection.to_macs_target(ranking, blocks, per_channel, total, target,
                                                 cfg["MIN_KEEP_RATIO"], cfg["ROUND_TO"])
    return chosen, reduction, f"most prunable by {score_name}{' (class-aware)' if cfg['CLASS_AWARE'] else ''} to {target:.0%} of MACs"


def block_table(blocks, chosen, before_macs, after_macs, total_before, total_after):
    rows = []
    for name, r in blocks.items():
        removed = len(chosen.get(name, []))
        rows.append([name, f"{r['hidden_channels']} -> {r['hidden_channels'] - removed}",
                     f"{100 * before_macs[name] / total_before:.1f}% -> {100 * after_macs[name] / total_after:.1f}%"])
    return rows


def summary(result):
    acc = result["accuracy"]
    rows = [["MACs", result["before"]["macs"], result["after"]["macs"]],
            ["params", result["before"]["params"], result["after"]["params"]],
            ["checkpoint MB", result["before"]["checkpoint_mb"], result["after"]["checkpoint_mb"]],
            ["top-1 (no recovery)", acc["baseline"]["top1"], acc["pruned"]["top1"]]]
    for step, label in (("bn_recalibrated", "top-1 (BN recalibrated)"), ("finetuned", "top-1 (fine-tuned)")):
        if step in acc:
            rows.append([label, acc["baseline"]["top1"], acc[step]["top1"]])
    return rows


def run_sweep(cfg, plan, blocks, model, per_channel, total, loaders, class_names, device):
    """Prune, recalibrate and score at every SWEEP value; returns the points."""
    mode, points = cfg["PRUNE_MODE"], []
    sweep_cfg = {**cfg, "FINETUNE_EPOCHS": 0, "BN_RECALIBRATE": True}
    for value in cfg["SWEEP"]:
        if mode == "threshold":
            stats = load_tensors(config.path_or_default(cfg, "STATS", "activation_stats.pt"), "activation statistics")
            proposals = propose(stats, blocks, describe_layers(blocks, plan["capture_point"]), plan["score"],
                                threshold=plan["threshold"], deadness_threshold=value,
                                min_keep_ratio=cfg["MIN_KEEP_RATIO"], round_to=cfg["ROUND_TO"],
                                class_aware=plan["class_aware"], min_class_samples=plan.get("min_class_samples", 5),
                                skip_blocks=cfg["SKIP_BLOCKS"], weights=model)
            chosen = {b: p["prune"] for b, p in proposals.items() if p["prune"]}
        else:
            chosen, _, _ = choose(cfg, plan, blocks, model, per_channel, total, mode, value)
        pruned, _ = prune_copy(model, blocks, chosen, cfg["IMAGE_SIZE"])
        steps = recover(pruned, loaders, class_names, device, sweep_cfg)
        macs, _ = count_macs_params(pruned, cfg["IMAGE_SIZE"])
        points.append({"value": value, "macs_reduction": round(1 - macs / total, 6),
                       "top1_pruned": steps["pruned"]["top1"], "top1_bn_recalibrated": steps["bn_recalibrated"]["top1"]})
        print(f"sweep {value}: MACs -{100 * points[-1]['macs_reduction']:.1f}%, top-1 "
              f"{points[-1]['top1_bn_recalibrated']:.4f} after BN recalibration")
    return points


def main(cfg):
    t0 = time.perf_counter()
    check_config(cfg)
    seed_everything(cfg["SEED"])
    device = models.pick_device(cfg["DEVICE"])
    checkpoint, model, meta, blocks, plan_path, plan = load_inputs(cfg)
    splits, class_names = stage.prepare_data(cfg)
    stage.check_class_names(meta, class_names, cfg["DATA_DIR"])
    model.to(device)
    loaders = make_loaders(cfg, splits)
    total, params = count_macs_params(model, cfg["IMAGE_SIZE"])
    per_channel = macs_per_channel(model, blocks, cfg["IMAGE_SIZE"])
    mode, target = cfg["PRUNE_MODE"], cfg["TARGET_MACS_REDUCTION"]
    chosen, predicted, how = choose(cfg, plan, blocks, model, per_channel, total, mode, target)
    if mode == "threshold" and predicted < MIN_USEFUL_REDUCTION:
        print(f"the plan removes only {100 * predicted:.1f}% of MACs (< {100 * MIN_USEFUL_REDUCTION:.0f}%): "
              "few channels are dead at its thresholds")
        if cfg["FALLBACK_TARGET"]:
            mode, target = "target_macs", cfg["FALLBACK_TARGET"]
            print(f"FALLBACK_TARGET={target}: pruning the most prunable channels to {100 * target:.0f}% of MACs instead")
            chosen, predicted, how = choose(cfg, plan, blocks, model, per_channel, total, mode, target)
    print(f"pruning {sum(map(len, chosen.values()))} channels in {len(chosen)} blocks: {how}")
    baseline_acc = score(model, loaders, class_names, device, "baseline")
    pruned, record = prune_copy(model, blocks, chosen, cfg["IMAGE_SIZE"])
    accuracy = {"baseline": baseline_acc, **recover(pruned, loaders, class_names, device, cfg)}
    after_macs, after_params = count_macs_params(pruned, cfg["IMAGE_SIZE"])
    out = os.path.join(cfg["RUN_DIR"], "pruned.pt")
    models.save_checkpoint(out, pruned, meta["arch"], class_names, cfg,
                           extra={"pruned_from_sha256": sha256_file(checkpoint), "pruned": chosen})
    last = list(accuracy)[-1]
    flagged = flag_class_drops(baseline_acc, accuracy[last])
    for acc in accuracy.values():
        acc.pop("correct")
    result = {
        "schema_version": 1, "kind": "mbv3prune-pruning-report", "mode": mode, "how": how,
        "target_macs_reduction": target if mode == "target_macs" else None,
        "blocks": {name: {**record.get(name, {"before": r["hidden_channels"], "after": r["hidden_channels"],
                                                  "removed": []}),
                          **({"skipped": "no expand conv"} if "expand" not in r else {})}
                   for name, r in blocks.items()},
        "before": {"macs": total, "params": params, "checkpoint_mb": file_size_mb(checkpoint)},
        "after": {"macs": after_macs, "params": after_params, "checkpoint_mb": file_size_mb(out)},
        "macs_reduction": round(1 - after_macs / total, 6), "params_reduction": round(1 - after_params / params, 6),
        "accuracy": accuracy, "flagged_classes": {"step": last, "drop_over_10_points": flagged},
        "pruned_widths": models.layer_widths(pruned),
        "provenance": provenance(cfg, {"checkpoint": checkpoint, "plan": plan_path}),
    }
    timings = {}
    if cfg["LATENCY"]:
        before_cost, after_cost = cost(model, cfg["IMAGE_SIZE"], device), cost(pruned, cfg["IMAGE_SIZE"], device)
        timings = {f"{k}_{tag}": c[k] for tag, c in (("before", before_cost), ("after", after_cost))
                   for k in ("latency_ms_b1", "latency_ms_b32")}
    wrote = [out]
    if cfg["SWEEP"]:
        points = run_sweep(cfg, plan, blocks, model, per_channel, total, loaders, class_names, device)
        result["sweep"] = points
        xlabel = "DEADNESS_THRESHOLD" if cfg["PRUNE_MODE"] == "threshold" else "TARGET_MACS_REDUCTION"
        wrote.append(plots.sweep([p["value"] for p in points], [p["top1_bn_recalibrated"] for p in points],
                                 [p["macs_reduction"] for p in points], xlabel,
                                 os.path.join(cfg["RUN_DIR"], "pruning_sweep.png"), baseline_acc["top1"]))
    wrote.append(write_json(os.path.join(cfg["RUN_DIR"], "pruning_report.json"), result))
    record_timings(cfg["RUN_DIR"], "pruning", {"seconds": time.perf_counter() - t0, **timings})
    after_blocks = block_macs(pruned, find_blocks(pruned), cfg["IMAGE_SIZE"])
    print("\n" + stage.table(block_table(blocks, chosen, block_macs(model, blocks, cfg["IMAGE_SIZE"]), after_blocks,
                                         total, after_macs), ["block", "hidden channels", "MACs share"]))
    print("\n" + stage.table(summary(result), ["", "before", "after"]))
    if timings:
        print(f"latency batch 1: {timings['latency_ms_b1_before']} -> {timings['latency_ms_b1_after']} ms; batch 32: "
              f"{timings['latency_ms_b32_before']} -> {timings['latency_ms_b32_after']} ms ({device})")
    for name, v in flagged.items():
        print(f"WARNING class {name!r} lost {100 * (v['before'] - v['after']):.0f} points ({v['before']:.2f} -> {v['after']:.2f})")
    stage.finish(wrote, f"python validate_model_structure.py --RUN_DIR={cfg['RUN_DIR']}")


if __name__ == "__main__":
    config.run(main, globals())
