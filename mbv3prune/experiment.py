"""One pruning experiment: prune a copy, then score it with no recovery, after BN recalibration, after fine-tuning.

Shared by the pruning stage, its threshold sweep and the benchmarks, so that every criterion is measured
by the same code.
"""

import copy

from .data import Skipped
from .errors import PruneError
from .evaluate import accuracy, latency_ms, recalibrate_bn
from .prune import prune_blocks
from .train import fit


def latencies(model, image_size, device):
    """Median latency (ms) of one forward pass at batch 1 and at batch 32 (synchronised on CUDA and MPS)."""
    return {
        "latency_ms_b1": latency_ms(model, image_size, 1, device),
        "latency_ms_b32": latency_ms(model, image_size, 32, device, repeats=5),
    }


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


def check_bn_recalibrate(value):
    """``value`` when it is True, False or "auto" (the words True and False, as ``--BN_RECALIBRATE=False``
    reads for a constant whose default is a string, as booleans), else a PruneError."""
    value = {"True": True, "False": False}.get(value, value) if isinstance(value, str) else value
    if not (value is True or value is False or value == "auto"):
        raise PruneError(f'BN_RECALIBRATE={value!r}: use True, False or "auto"')
    return value


def val_top1(model, loaders, class_names, device):
    """Top-1 on the validation split (what choices are made on; never the test split)."""
    return accuracy(model, loaders["val"], device, class_names, Skipped(), desc="val")["top1"]


def recalibrated(model, loaders, device, bn_batches):
    """A copy of ``model`` with BN statistics re-estimated on training batches."""
    return recalibrate_bn(copy.deepcopy(model), loaders["bn"], device, Skipped(), bn_batches)


def _bn_step(pruned, loaders, class_names, device, cfg):
    """The BN-recalibrated step's accuracy; with "auto" the recalibration is kept only when val top-1 rises."""
    trial = recalibrated(pruned, loaders, device, cfg["BN_BATCHES"])
    step = eval_accuracy(trial, loaders, class_names, device, "bn recalibrated")
    kept = True
    if cfg["BN_RECALIBRATE"] == "auto":
        before, after = val_top1(pruned, loaders, class_names, device), val_top1(trial, loaders, class_names, device)
        kept = after > before
        step.update({"val_top1_before": before, "val_top1_after": after, "kept": kept})
    if kept:
        pruned.load_state_dict(trial.state_dict())
    return step


def delivered_step(steps):
    """The step whose model the pruning stage saves: fine-tuned, else BN-recalibrated when kept, else pruned."""
    if "finetuned" in steps:
        return "finetuned"
    return "bn_recalibrated" if steps.get("bn_recalibrated", {}).get("kept", "bn_recalibrated" in steps) else "pruned"


def recover(pruned, loaders, class_names, device, cfg, log=print):
    """{step: accuracy} for ``pruned`` (modified in place): no recovery, BN recalibrated, fine-tuned.

    ``BN_RECALIBRATE``: True recalibrates, False does not, "auto" keeps the recalibrated statistics only
    when val top-1 improves (its step records both val figures and ``kept``). Under torchrun every process
    runs all steps; the fine-tuning is DistributedDataParallel (``cfg["AMP"]``: autocast on CUDA) and leaves
    identical weights everywhere.
    """
    steps = {"pruned": eval_accuracy(pruned, loaders, class_names, device, "pruned")}
    if check_bn_recalibrate(cfg["BN_RECALIBRATE"]):
        steps["bn_recalibrated"] = _bn_step(pruned, loaders, class_names, device, cfg)
    if cfg["FINETUNE_EPOCHS"]:
        fit(
            pruned,
            loaders,
            class_names,
            device,
            cfg["FINETUNE_EPOCHS"],
            cfg["FINETUNE_LR"],
            log=log,
            bn_batches=cfg["BN_BATCHES"],
            warmup_epochs=0,
            amp=cfg.get("AMP", False),
        )
        steps["finetuned"] = eval_accuracy(pruned, loaders, class_names, device, "fine-tuned")
    return steps
