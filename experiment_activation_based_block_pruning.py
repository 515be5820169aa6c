"""Prune the hidden channels of every inverted-residual block with torch-pruning, then measure what it cost.

Reads:  CHECKPOINT (default RUN_DIR/baseline.pt), RUN_DIR/mobilenetv3_block_structure.json, the pruning plan
        PLAN (default RUN_DIR/pruning_plan_default.json) and, for every mode but a plain threshold prune,
        the activation statistics RUN_DIR/activation_stats.pt (with second moments for obs and the refit).
Writes: RUN_DIR/pruned.pt (loads with weights_only=True and rebuilds the pruned widths itself),
        RUN_DIR/pruning_report.json (per block before -> after and its relative output error on val, MACs,
        params, top-1 and per-class accuracy with no recovery, BN recalibration and fine-tuning, the
        recalibrated baseline; classes that lost > 10 points flagged), RUN_DIR/timings.json (latency, stage
        time), with SWEEP RUN_DIR/pruning_sweep.png, with target_latency RUN_DIR/latency_table_<runtime>.json.
Each block is pruned with ONE torch-pruning dependency group rooted at its expand conv's output channels:
it covers the BN, the depthwise conv, SE fc1 / fc2 and the project conv. Blocks without an expand conv are
skipped (their channels are tied to the stem and the residual path).
PRUNE_MODE: target_macs (one global ranking by SCORE, ROUND_TO chunks, until MACs fall by
TARGET_MACS_REDUCTION; obs ranks chunks by their cost per MAC saved), target_latency (the same per
millisecond saved, contribution and fluctuation in output units by their squares as costs too, from a
measured per-block latency table, re-aimed until the whole pruned model timed in that runtime saves the
target: mbv3prune/latency_feedback.py), threshold (exactly the plan's `prune` indices)
or iterative (block by block, re-measuring downstream blocks after each round: mbv3prune/iterative.py).
RECONSTRUCT=sequential refits each block's kept project conv and SE fc1 columns by least squares, in forward
order, on the pruned model's inputs toward the original model's outputs (mbv3prune/reconstruct.py), so no
fine-tuning is needed; oneshot refits from the captured moments; none folds only the removed channels'
mean in (COMPENSATE). Under torchrun every process prunes and scores identically and the fine-tuning runs as
DistributedDataParallel (each process its own part of the training set); rank 0 alone writes and prints.

    python experiment_activation_based_block_pruning.py --RUN_DIR=runs/demo --TARGET_MACS_REDUCTION=0.4
    torchrun --nproc_per_node=4 experiment_activation_based_block_pruning.py --RUN_DIR=runs/demo --FINETUNE_EPOCHS=4
"""

import os
import time

from mbv3prune import config, distributed, models, pruning, report, stage
from mbv3prune.artifacts import record_timings, sha256_file, write_json
from mbv3prune.errors import PruneError
from mbv3prune.experiment import check_bn_recalibrate, eval_accuracy, recover
from mbv3prune.loading import load_run
from mbv3prune.train import seed_everything

# -----------------------------------------------------------------------------
DATA_DIR = "data/synthetic-species"  # data set: train split for BN recalibration and fine-tuning, test/val to score
RUN_DIR = "runs/demo"  # where every stage reads and writes its artifacts
MODEL_ARCH = "mobilenet_v3_large"  # mobilenet_v3_large or mobilenet_v3_small (must match the checkpoint)
CHECKPOINT = ""  # model to prune ("" = RUN_DIR/baseline.pt)
ALLOW_PICKLE = False  # allow CHECKPOINT to be a whole-model pickle (runs code from the file: only if you trust it)
PLAN = ""  # pruning plan ("" = RUN_DIR/pruning_plan_default.json)
STATS = ""  # activation statistics for target_macs, iterative, COMPENSATE and SWEEP ("" = RUN_DIR/activation_stats.pt)
PRUNE_MODE = "target_macs"  # target_macs (a global ranking to a MACs target), target_latency, threshold, iterative
TARGET_MACS_REDUCTION = 0.5  # target_macs: fraction of MACs to remove; iterative: stop once reached (0 = never)
TARGET_LATENCY_REDUCTION = 0.2  # target_latency: fraction of the measured latency to remove
LATENCY_RUNTIME = "onnxruntime"  # target_latency: runtime of the per-block latency table (onnxruntime or eager)
LATENCY_BATCH = 1  # target_latency: batch size the latency table is measured at
LATENCY_REPEATS = 50  # target_latency: timed runs per block and width (median; after a warm-up)
LATENCY_CALIBRATE = 3  # target_latency: times the table's target is re-aimed from the whole model's timing (0 = never)
LATENCY_CHECK_REPEATS = 200  # target_latency: interleaved runs of the whole baseline and pruned model per round
BLOCKS_PER_ROUND = 1  # iterative: blocks pruned per round before re-measuring downstream
MAX_ROUNDS = 30  # iterative: most rounds
COMPENSATE = True  # fold the removed channels' mean contribution into the project BN and SE fc1 (project_input stats)
CORRECT_VARIANCE = False  # with COMPENSATE: also lower the project BN's running_var by the removed variance
RECONSTRUCT = "sequential"  # sequential / oneshot: least-squares refit of kept project and SE fc1; none: COMPENSATE
RIDGE = 1e-3  # refit and obs: ridge toward the kept weights, x the mean diagonal of the covariance
RESIDUAL_TARGET = True  # sequential: residual blocks also absorb the difference of the two models' block inputs
REFIT_SAMPLES_PER_CLASS = 32  # sequential: images per class of the capture's sample the refit runs on (0 = all)
OUTPUT_UNITS = True  # contribution / fluctuation: weigh the project conv column by its BN's scale
FALLBACK_TARGET = 0.0  # threshold mode: when the plan removes < 10% of MACs, prune to this MACs target instead (0 = no)
SCORE = ""  # ranking: obs, fluctuation, contribution, mean_abs or deadness ("" = the plan's score)
CLASS_AWARE = False  # target_macs with deadness: rank a channel by its deadness in the class where it is most alive
SKIP_BLOCKS = []  # blocks never to touch, e.g. ["features.15"]
MIN_KEEP_RATIO = 0.25  # every block keeps at least this fraction of its hidden channels (and at least 8)
ROUND_TO = 8  # kept hidden channels are a multiple of this (target_macs; a plan off it gets a warning)
BN_RECALIBRATE = "auto"  # re-estimate BN statistics after pruning: True, False or "auto" (kept only if val top-1 rises)
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


def check_config(cfg):
    pruning.check_mode(cfg)
    cfg["BN_RECALIBRATE"] = check_bn_recalibrate(cfg["BN_RECALIBRATE"])  # --BN_RECALIBRATE=False reads as a word
    for name in ("ROUND_TO", "BN_BATCHES", "BLOCKS_PER_ROUND", "MAX_ROUNDS"):
        if cfg[name] < 1:
            raise PruneError(f"{name}={cfg[name]} must be at least 1")
    if cfg["FINETUNE_EPOCHS"] < 0:
        raise PruneError(f"FINETUNE_EPOCHS={cfg['FINETUNE_EPOCHS']} must be >= 0")


def main(cfg):
    t0 = time.perf_counter()
    check_config(cfg)
    seed_everything(cfg["SEED"])
    run = load_run(cfg, plan=True, stats=pruning.needs_stats(cfg), structure=True)
    cfg = run.cfg  # with SPLIT_SEED, the checkpoint's own train / val split (recorded in pruned.pt)
    crit = pruning.criterion(run, cfg)
    baseline = eval_accuracy(run.model, run.loaders, run.class_names, run.device, "baseline")
    pruned, chosen, how, extra = pruning.prune(run, cfg, crit)
    print(f"pruned {sum(map(len, chosen.values()))} channels in {len(chosen)} blocks: {how}")
    report.print_skipped(run, cfg["SKIP_BLOCKS"])
    extra["block_output_error"] = report.block_output_errors(run, pruned)
    extra["baseline_bn_recalibrated"] = report.baseline_recalibrated(run, cfg)  # recalibration alone, for scale
    accuracy = {"baseline": baseline, **recover(pruned, run.loaders, run.class_names, run.device, cfg)}
    if not distributed.is_main():
        return  # the other processes only helped fine-tune: rank 0 writes, measures latency and reports
    out = os.path.join(cfg["RUN_DIR"], "pruned.pt")
    models.save_checkpoint(
        out,
        pruned,
        run.meta["arch"],
        run.class_names,
        cfg,
        extra={"pruned_from_sha256": sha256_file(run.checkpoint), "pruned": chosen},
    )
    figures = extra.pop("figures", [])
    result = report.pruning_report(run, cfg, pruned, chosen, how, extra, accuracy, out)
    if cfg["SWEEP"]:
        result["sweep"], figure = pruning.sweep(run, cfg, crit)
        figures.append(figure)
    wrote = [out, *figures, write_json(os.path.join(cfg["RUN_DIR"], "pruning_report.json"), result)]
    timings = report.latency(run, cfg, pruned)
    record_timings(cfg["RUN_DIR"], "pruning", {"seconds": time.perf_counter() - t0, **timings})
    report.print_summary(run, cfg, pruned, chosen, result, timings)
    stage.finish(wrote, f"python validate_model_structure.py --RUN_DIR={cfg['RUN_DIR']}")


if __name__ == "__main__":
    config.run(main, globals())
