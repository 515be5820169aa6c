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
PRUNE_MODE: threshold (exactly the plan's per-block `prune` indices), target_macs (rank every block's
channels by SCORE and prune the most prunable until MACs fall by TARGET_MACS_REDUCTION) or iterative
(block by block in forward order, re-measuring downstream blocks after each round and pruning only
channels that stay dead: see mbv3prune/iterative.py). With COMPENSATE=True the removed channels' mean
contribution is folded into the project BN and the SE fc1 bias first (lossless for constant channels).
Under torchrun every process prunes and scores identically and the fine-tuning runs as DistributedDataParallel
(each process its own part of the training set, BATCH_SIZE per process); rank 0 alone writes and prints.

    python experiment_activation_based_block_pruning.py --RUN_DIR=runs/demo --PRUNE_MODE=target_macs
    torchrun --nproc_per_node=4 experiment_activation_based_block_pruning.py --RUN_DIR=runs/demo --FINETUNE_EPOCHS=4
"""
import os
import time
import warnings
from types import SimpleNamespace

from mbv3prune import config, distributed, iterative, measure, models, plots, selection, stage
from mbv3prune.artifacts import provenance, read_json, record_timings, sha256_file, write_json
from mbv3prune.blocks import find_blocks
from mbv3prune.capture import describe_layers
from mbv3prune.compensate import check_capture_point, folder
from mbv3prune.data import Skipped, batches
from mbv3prune.errors import PruneError
from mbv3prune.evaluate import file_size_mb, flag_class_drops
from mbv3prune.experiment import latencies, make_loaders, prune_copy, recover, score
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
STATS = ""  # activation statistics for target_macs, iterative, COMPENSATE and SWEEP ("" = RUN_DIR/activation_stats.pt)
PRUNE_MODE = "threshold"  # threshold (the plan's indices), target_macs or iterative (re-measure after each block)
TARGET_MACS_REDUCTION = 0.2  # target_macs: fraction of MACs to remove; iterative: stop once reached (0 = never)
BLOCKS_PER_ROUND = 1  # iterative: blocks pruned per round before re-measuring downstream
MAX_ROUNDS = 30  # iterative: most rounds
COMPENSATE = True  # fold the removed channels' mean contribution into the project BN and SE fc1 (project_input stats)
CORRECT_VARIANCE = False  # with COMPENSATE: also lower the project BN's running_var by the removed variance
FALLBACK_TARGET = 0.0  # threshold mode: when the plan removes < 10% of MACs, prune to this MACs target instead (0 = no)
SCORE = ""  # target_macs ranking: deadness, mean_abs, contribution or fluctuation ("" = the plan's score)
CLASS_AWARE = False  # target_macs with deadness: rank a channel by its deadness in the class where it is most alive
SKIP_BLOCKS = []  # blocks never to touch, e.g. ["features.15"]
MIN_KEEP_RATIO = 0.25  # every block keeps at least this fraction of its hidden channels (and at least 8)
ROUND_TO = 8  # kept hidden channels are a multiple of this (target_macs; a plan off it gets a warning)
BN_RECALIBRATE = True  # re-estimate BN statistics on training batches after pruning (reported separately)
BN_BATCHES = 20  # training batches used to re-estimate BN statistics
FINETUNE_EPOCHS = 0  # fine-tuning epochs after pruning (train_model.py's recipe; 0 = none)
FINETUNE_LR = 5e-4  # peak learning rate of the fine-tuning
AMP = True  # on CUDA, fine-tune under autocast (bf16 where supported, else fp16 with loss scaling); no effect on CPU
SWEEP = []  # thresholds (threshold mode: DEADNESS_THRESHOLD values) or MACs targets (target_macs) to compare
LATENCY = True  # measure latency at batch 1 and 32 (into timings.json)
IMAGE_SIZE = 64  # input resolution for MACs, latency and accuracy
BATCH_SIZE = 64  # images per batch (per process under torchrun)
NUM_WORKERS = 2  # data-loading worker processes
DEVICE = "auto"  # auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps
SEED = 0  # seeds data order and fine-tuning
DEBUG = False  # show tracebacks of the project's errors
# -----------------------------------------------------------------------------
PRUNE_MODES = ("threshold", "target_macs", "iterative")
MIN_USEFUL_REDUCTION = 0.10  # below this a plan is reported as not worth pruning


def check_config(cfg):
    if cfg["PRUNE_MODE"] not in PRUNE_MODES:
        raise PruneError(f"unknown PRUNE_MODE {cfg['PRUNE_MODE']!r}: use one of {', '.join(PRUNE_MODES)}")
    for name in ("TARGET_MACS_REDUCTION", "FALLBACK_TARGET"):
        if not 0 <= cfg[name] < 1:
            raise PruneError(f"{name}={cfg[name]} must lie in [0, 1)")
    if not 0 <= cfg["MIN_KEEP_RATIO"] <= 1:
        raise PruneError(f"MIN_KEEP_RATIO={cfg['MIN_KEEP_RATIO']} must lie in [0, 1]")
    for name in ("ROUND_TO", "BN_BATCHES", "BLOCKS_PER_ROUND", "MAX_ROUNDS"):
        if cfg[name] < 1:
            raise PruneError(f"{name}={cfg[name]} must be at least 1")
    if cfg["FINETUNE_EPOCHS"] < 0:
        raise PruneError(f"FINETUNE_EPOCHS={cfg['FINETUNE_EPOCHS']} must be >= 0")
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


def load_context(cfg):
    """Everything the modes share: model, blocks, plan, stats (when needed), data, MACs."""
    ctx = SimpleNamespace(cfg=cfg, device=distributed.setup(cfg["DEVICE"]))
    ctx.checkpoint = config.path_or_default(cfg, "CHECKPOINT", "baseline.pt")
    ctx.model, ctx.meta = models.load_checkpoint(ctx.checkpoint, cfg["MODEL_ARCH"], cfg["ALLOW_PICKLE"])
    ctx.blocks = load_structure(os.path.join(cfg["RUN_DIR"], "mobilenetv3_block_structure.json"), ctx.model)
    ctx.plan_path = config.path_or_default(cfg, "PLAN", "pruning_plan_default.json")
    widths = models.layer_widths(ctx.model)
    ctx.plan = load_plan(ctx.plan_path, ctx.blocks, widths)
    warning = check_plan_matches_model(ctx.plan, ctx.meta["arch"], widths, sha256_file(ctx.checkpoint))
    if warning:
        warnings.warn(warning)
    ctx.layers = describe_layers(ctx.blocks, ctx.plan["capture_point"])
    needs_stats = cfg["PRUNE_MODE"] != "threshold" or cfg["COMPENSATE"] or cfg["SWEEP"] or cfg["FALLBACK_TARGET"]
    ctx.stats, ctx.stats_meta = load_stats(cfg, ctx.checkpoint) if needs_stats else (None, None)
    if cfg["COMPENSATE"]:
        check_capture_point(ctx.plan["capture_point"])
    ctx.splits, ctx.class_names = stage.prepare_data(cfg)
    stage.check_class_names(ctx.meta, ctx.class_names, cfg["DATA_DIR"])
    models.to_device(ctx.model, ctx.device)
    ctx.loaders = make_loaders(cfg, ctx.splits)
    ctx.total, ctx.params = count_macs_params(ctx.model, cfg["IMAGE_SIZE"])
    ctx.per_channel = macs_per_channel(ctx.model, ctx.blocks, cfg["IMAGE_SIZE"])
    return ctx


def load_stats(cfg, checkpoint):
    """The saved activation statistics, refused when they were measured on another checkpoint."""
    return measure.load_checked(config.path_or_default(cfg, "STATS", "activation_stats.pt"), checkpoint)


def compensator(ctx):
    """The compensation applied before every prune (None with COMPENSATE=False)."""
    if not ctx.cfg["COMPENSATE"]:
        return None
    return folder(ctx.plan["capture_point"], ctx.cfg["CORRECT_VARIANCE"])


def choose(ctx, mode, target):
    """(selection, how it was chosen) for the one-shot modes."""
    cfg, plan = ctx.cfg, ctx.plan
    if mode == "threshold":
        chosen = selection.from_plan(plan, ctx.blocks, cfg["SKIP_BLOCKS"], cfg["MIN_KEEP_RATIO"], cfg["ROUND_TO"])
        return chosen, f"the plan's indices ({plan['score']} > {plan['deadness_threshold']})"
    score_name = cfg["SCORE"] or plan["score"]
    ranking = selection.rank_channels(ctx.stats, ctx.blocks, ctx.layers, score_name, plan["threshold"],
                                      cfg["CLASS_AWARE"], plan["min_class_samples"], ctx.model, cfg["SKIP_BLOCKS"])
    chosen, _ = selection.to_macs_target(ranking, ctx.blocks, ctx.per_channel, ctx.total, target,
                                         cfg["MIN_KEEP_RATIO"], cfg["ROUND_TO"])
    aware = " (class-aware)" if cfg["CLASS_AWARE"] else ""
    return chosen, f"most prunable by {score_name}{aware} to {target:.0%} of MACs"


def predicted_reduction(ctx, chosen):
    return sum(len(v) * ctx.per_channel[b] for b, v in chosen.items()) / ctx.total


def prune_one_shot(ctx):
    """Threshold or target_macs: (pruned model, selection, how, extra report)."""
    cfg, mode, target = ctx.cfg, ctx.cfg["PRUNE_MODE"], ctx.cfg["TARGET_MACS_REDUCTION"]
    chosen, how = choose(ctx, mode, target)
    extra = {"target_macs_reduction": target if mode == "target_macs" else None}
    if mode == "threshold" and predicted_reduction(ctx, chosen) < MIN_USEFUL_REDUCTION:
        print(f"the plan removes only {100 * predicted_reduction(ctx, chosen):.1f}% of MACs "
              f"(< {100 * MIN_USEFUL_REDUCTION:.0f}%): few channels are dead at its thresholds")
        if cfg["FALLBACK_TARGET"]:
            mode, target = "target_macs", cfg["FALLBACK_TARGET"]
            print(f"FALLBACK_TARGET={target}: pruning the most prunable channels to {100 * target:.0f}% of MACs instead")
            chosen, how = choose(ctx, mode, target)
            extra = {"target_macs_reduction": target, "fallback": "plan removed < 10% of MACs"}
    pruned, _ = prune_copy(ctx.model, ctx.blocks, chosen, cfg["IMAGE_SIZE"], ctx.stats, compensator(ctx))
    return pruned, chosen, how, {"mode": mode, **extra}


def prune_iteratively(ctx):
    """Iterative mode: (pruned model, selection, how, extra report with the per-round log)."""
    cfg, plan = ctx.cfg, ctx.plan
    sample_loader = stage.loader(cfg, measure.sample_items(ctx.stats_meta, cfg["DATA_DIR"]))
    opts = {"score": cfg["SCORE"] or plan["score"], "threshold": plan["threshold"],
            "deadness_threshold": plan["deadness_threshold"], "class_aware": plan["class_aware"],
            "min_class_samples": plan["min_class_samples"], "min_keep_ratio": cfg["MIN_KEEP_RATIO"],
            "round_to": cfg["ROUND_TO"], "skip_blocks": cfg["SKIP_BLOCKS"], "weights": ctx.model,
            "blocks_per_round": cfg["BLOCKS_PER_ROUND"], "max_rounds": cfg["MAX_ROUNDS"],
            "target_macs_reduction": cfg["TARGET_MACS_REDUCTION"], "capture_point": plan["capture_point"]}
    pruned, rounds, chosen, measured = iterative.run(
        ctx.model, lambda: batches(sample_loader, Skipped(), ctx.device), ctx.stats, ctx.layers, opts,
        cfg["IMAGE_SIZE"], len(ctx.class_names), compensator(ctx),
        lambda m: score(m, ctx.loaders, ctx.class_names, ctx.device, "round")["top1"])
    figures = [] if not distributed.is_main() else [
        plots.deadness_rounds(measured["initial_values"], measured["latest_values"],
                              opts["deadness_threshold"] if opts["score"] == "deadness" else opts["threshold"],
                              os.path.join(cfg["RUN_DIR"], "deadness_rounds.png"), opts["score"])]
    cut = f"> {opts['deadness_threshold']}" if opts["score"] == "deadness" else f"< {opts['threshold']:g}"
    how = f"iterative: consistently {opts['score']} {cut}, {len(rounds)} rounds"
    return pruned, chosen, how, {"mode": "iterative", "rounds": rounds, "figures": figures,
                                 "target_macs_reduction": cfg["TARGET_MACS_REDUCTION"] or None}


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


def run_sweep(ctx):
    """Prune, recalibrate and score at every SWEEP value; returns the points."""
    cfg, plan, points = ctx.cfg, ctx.plan, []
    sweep_cfg = {**cfg, "FINETUNE_EPOCHS": 0, "BN_RECALIBRATE": True}
    for value in cfg["SWEEP"]:
        if cfg["PRUNE_MODE"] == "target_macs":
            chosen, _ = choose(ctx, "target_macs", value)
        else:
            proposals = propose(ctx.stats, ctx.blocks, ctx.layers, plan["score"], threshold=plan["threshold"],
                                deadness_threshold=value, min_keep_ratio=cfg["MIN_KEEP_RATIO"], round_to=cfg["ROUND_TO"],
                                class_aware=plan["class_aware"], min_class_samples=plan["min_class_samples"],
                                skip_blocks=cfg["SKIP_BLOCKS"], weights=ctx.model)
            chosen = {b: p["prune"] for b, p in proposals.items() if p["prune"]}
        pruned, _ = prune_copy(ctx.model, ctx.blocks, chosen, cfg["IMAGE_SIZE"], ctx.stats, compensator(ctx))
        steps = recover(pruned, ctx.loaders, ctx.class_names, ctx.device, sweep_cfg)
        macs, _ = count_macs_params(pruned, cfg["IMAGE_SIZE"])
        points.append({"value": value, "macs_reduction": round(1 - macs / ctx.total, 6),
                       "top1_pruned": steps["pruned"]["top1"], "top1_bn_recalibrated": steps["bn_recalibrated"]["top1"]})
        print(f"sweep {value}: MACs -{100 * points[-1]['macs_reduction']:.1f}%, top-1 "
              f"{points[-1]['top1_bn_recalibrated']:.4f} after BN recalibration")
    xlabel = "TARGET_MACS_REDUCTION" if cfg["PRUNE_MODE"] == "target_macs" else "DEADNESS_THRESHOLD"
    figure = plots.sweep([p["value"] for p in points], [p["top1_bn_recalibrated"] for p in points],
                         [p["macs_reduction"] for p in points], xlabel,
                         os.path.join(cfg["RUN_DIR"], "pruning_sweep.png"))
    return points, figure


def report(ctx, pruned, chosen, how, extra, accuracy, out):
    """The pruning report (byte-stable: no timings)."""
    after_macs, after_params = count_macs_params(pruned, ctx.cfg["IMAGE_SIZE"])
    last = list(accuracy)[-1]
    flagged = flag_class_drops(accuracy["baseline"], accuracy[last])
    for acc in accuracy.values():
        acc.pop("correct", None)
    return {
        "schema_version": 1, "kind": "mbv3prune-pruning-report", "how": how, **extra,
        "compensated": ctx.cfg["COMPENSATE"],
        "blocks": {name: {"before": r["hidden_channels"], "after": r["hidden_channels"] - len(chosen.get(name, [])),
                          "removed": chosen.get(name, []), **({"skipped": "no expand conv"} if "expand" not in r else {})}
                   for name, r in ctx.blocks.items()},
        "before": {"macs": ctx.total, "params": ctx.params, "checkpoint_mb": file_size_mb(ctx.checkpoint)},
        "after": {"macs": after_macs, "params": after_params, "checkpoint_mb": file_size_mb(out)},
        "macs_reduction": round(1 - after_macs / ctx.total, 6), "params_reduction": round(1 - after_params / ctx.params, 6),
        "accuracy": accuracy, "flagged_classes": {"step": last, "drop_over_10_points": flagged},
        "pruned_widths": models.layer_widths(pruned),
        "provenance": provenance(ctx.cfg, {"checkpoint": ctx.checkpoint, "plan": ctx.plan_path}),
    }


def measure_latency(ctx, pruned):
    if not ctx.cfg["LATENCY"]:
        return {}
    measured = {tag: latencies(m, ctx.cfg["IMAGE_SIZE"], ctx.device) for tag, m in (("before", ctx.model), ("after", pruned))}
    return {f"{k}_{tag}": v for tag, times in measured.items() for k, v in times.items()}


def print_summary(ctx, pruned, chosen, result, timings):
    after_blocks = block_macs(pruned, find_blocks(pruned), ctx.cfg["IMAGE_SIZE"])
    before_blocks = block_macs(ctx.model, ctx.blocks, ctx.cfg["IMAGE_SIZE"])
    print("\n" + stage.table(block_table(ctx.blocks, chosen, before_blocks, after_blocks, ctx.total,
                                         result["after"]["macs"]), ["block", "hidden channels", "MACs share"]))
    print("\n" + stage.table(summary(result), ["", "before", "after"]))
    if timings:
        print(f"latency batch 1: {timings['latency_ms_b1_before']} -> {timings['latency_ms_b1_after']} ms; batch 32: "
              f"{timings['latency_ms_b32_before']} -> {timings['latency_ms_b32_after']} ms ({ctx.device})")
    for name, v in result["flagged_classes"]["drop_over_10_points"].items():
        print(f"WARNING class {name!r} lost {100 * (v['before'] - v['after']):.0f} points ({v['before']:.2f} -> {v['after']:.2f})")


def main(cfg):
    t0 = time.perf_counter()
    check_config(cfg)
    seed_everything(cfg["SEED"])
    ctx = load_context(cfg)
    baseline_acc = score(ctx.model, ctx.loaders, ctx.class_names, ctx.device, "baseline")
    prune_fn = prune_iteratively if cfg["PRUNE_MODE"] == "iterative" else prune_one_shot
    pruned, chosen, how, extra = prune_fn(ctx)
    print(f"pruned {sum(map(len, chosen.values()))} channels in {len(chosen)} blocks: {how}")
    for name, roles in ctx.blocks.items():
        if "expand" not in roles or name in cfg["SKIP_BLOCKS"]:
            reason = "in SKIP_BLOCKS" if name in cfg["SKIP_BLOCKS"] else "no expand conv (channels tied to the stem and residual)"
            print(f"  skipped {name}: {reason}")
    accuracy = {"baseline": baseline_acc, **recover(pruned, ctx.loaders, ctx.class_names, ctx.device, cfg)}
    if not distributed.is_main():
        return  # the other processes only helped fine-tune: rank 0 writes, measures latency and reports
    out = os.path.join(cfg["RUN_DIR"], "pruned.pt")
    models.save_checkpoint(out, pruned, ctx.meta["arch"], ctx.class_names, cfg,
                           extra={"pruned_from_sha256": sha256_file(ctx.checkpoint), "pruned": chosen})
    figures = extra.pop("figures", [])
    result = report(ctx, pruned, chosen, how, extra, accuracy, out)
    if cfg["SWEEP"]:
        result["sweep"], figure = run_sweep(ctx)
        figures.append(figure)
    wrote = [out, *figures, write_json(os.path.join(cfg["RUN_DIR"], "pruning_report.json"), result)]
    timings = measure_latency(ctx, pruned)
    record_timings(cfg["RUN_DIR"], "pruning", {"seconds": time.perf_counter() - t0, **timings})
    print_summary(ctx, pruned, chosen, result, timings)
    stage.finish(wrote, f"python validate_model_structure.py --RUN_DIR={cfg['RUN_DIR']}")


if __name__ == "__main__":
    config.run(main, globals())
