"""One pruning experiment: prune a copy, then score it with no recovery, after BN recalibration, after fine-tuning.

Shared by the pruning stage, its threshold sweep and the benchmarks, so that every criterion is measured
by the same code.
"""
import copy

from . import stage
from .data import Skipped, eval_split
from .evaluate import accuracy, latency_ms, recalibrate_bn
from .prune import prune_blocks
from .train import fit


def make_loaders(cfg, splits):
    """Loaders: ``eval`` (test, else val), ``val``, ``bn`` (un-augmented train batches), ``train`` (augmented;
    under torchrun each process's own part)."""
    return {"eval": stage.loader(cfg, splits[eval_split(splits)]),
            "val": stage.loader(cfg, splits["val"]),
            "bn": stage.loader(cfg, splits["train"], shuffle=True),
            "train": stage.loader(cfg, splits["train"], train=True, shuffle=True)}


def latencies(model, image_size, device):
    """Median latency (ms) of one forward pass at batch 1 and at batch 32 (CUDA synchronised)."""
    return {"latency_ms_b1": latency_ms(model, image_size, 1, device),
            "latency_ms_b32": latency_ms(model, image_size, 32, device, repeats=5)}


def score(model, loaders, class_names, device, desc="eval"):
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
    steps = {"pruned": score(pruned, loaders, class_names, device, "pruned")}
    if cfg["BN_RECALIBRATE"]:
        recalibrate_bn(pruned, loaders["bn"], device, Skipped(), cfg["BN_BATCHES"])
        steps["bn_recalibrated"] = score(pruned, loaders, class_names, device, "bn recalibrated")
    if cfg["FINETUNE_EPOCHS"]:
        fit(pruned, loaders, class_names, device, cfg["FINETUNE_EPOCHS"], cfg["FINETUNE_LR"], log=log,
            bn_batches=cfg["BN_BATCHES"], warmup_epochs=0, amp=cfg.get("AMP", False))
        steps["finetuned"] = score(pruned, loaders, class_names, device, "fine-tuned")
    return steps
