"""One pruning experiment: prune a copy, then score it with no recovery, after BN recalibration, after fine-tuning.

Shared by the pruning stage, its threshold sweep and the benchmarks, so that every criterion is measured
by the same code.
"""
import copy

from .data import Skipped
from .evaluate import accuracy, latency_ms, recalibrate_bn
from .prune import prune_blocks
from .train import fit


def latencies(model, image_size, device):
    """Median latency (ms) of one forward pass at batch 1 and at batch 32 (CUDA synchronised)."""
    return {"latency_ms_b1": latency_ms(model, image_size, 1, device),
            "latency_ms_b32": latency_ms(model, image_size, 32, device, repeats=5)}


def eval_accuracy(model, loaders, class_names, device, desc="eval"):
    """Accuracy on the eval split (top-1, per class, per-sample correctness)."""
    return accuracy(model, loaders["eval"], device, class_names, Skipped(), desc=desc)


def prune_copy(model, blocks, selection, image_size, stats=None, compensate_fn=None):
    """A pruned deep copy of ``model`` (the original is untouched) and the per-block record.

    ``compensate_fn(model, blocks, selection, stats)`` folds the removed channels in first (see compensate).
    """
    pruned = copy.deepcopy(model)
    if compensate_fn is not None:
        compensate_fn(pruned, blocks, selection, stats)
    record = prune_blocks(pruned, blocks, selection, image_size)
    return pruned.eval(), record


def recover(pruned, loaders, class_names, device, cfg, log=print):
    """{step: accuracy} for ``pruned`` (modified in place): no recovery, BN recalibrated, fine-tuned.

    Under torchrun every process runs all steps; the fine-tuning is DistributedDataParallel (``cfg["AMP"]``:
    autocast on CUDA) and leaves identical weights everywhere.
    """
    steps = {"pruned": eval_accuracy(pruned, loaders, class_names, device, "pruned")}
    if cfg["BN_RECALIBRATE"]:
        recalibrate_bn(pruned, loaders["bn"], device, Skipped(), cfg["BN_BATCHES"])
        steps["bn_recalibrated"] = eval_accuracy(pruned, loaders, class_names, device, "bn recalibrated")
    if cfg["FINETUNE_EPOCHS"]:
        fit(pruned, loaders, class_names, device, cfg["FINETUNE_EPOCHS"], cfg["FINETUNE_LR"], log=log,
            bn_batches=cfg["BN_BATCHES"], warmup_epochs=0, amp=cfg.get("AMP", False))
        steps["finetuned"] = eval_accuracy(pruned, loaders, class_names, device, "fine-tuned")
    return steps
