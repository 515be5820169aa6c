"""Accuracy (top-1 and per class), BN recalibration, latency and checkpoint size."""

import os

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from . import distributed
from .data import batches
from .timing import eager_call, median_ms, synchronizer


@torch.inference_mode()
def predict(model, loader, device, skipped, desc="eval"):
    """(predicted labels, true labels, max softmax) over a loader, in eval mode."""
    model.eval()
    preds, labels, conf = [], [], []
    for images, y in tqdm(
        batches(loader, skipped, device),
        total=len(loader),
        desc=desc,
        leave=False,
        disable=None if distributed.is_main() else True,
    ):
        probs = model(images).float().softmax(dim=1)
        c, p = probs.max(dim=1)
        preds.append(p.cpu()), labels.append(y.cpu()), conf.append(c.cpu())
    return torch.cat(preds), torch.cat(labels), torch.cat(conf)


def accuracy(model, loader, device, class_names, skipped, desc="eval"):
    """{"top1", "per_class": {name: acc}, "n", "correct": per-sample 0/1} on a loader."""
    pred, true, _ = predict(model, loader, device, skipped, desc)
    correct = (pred == true).to(torch.int64)
    per_class = {}
    for label, name in enumerate(class_names):
        mask = true == label
        per_class[name] = round(float(correct[mask].float().mean()), 6) if mask.any() else None
    return {
        "top1": round(float(correct.float().mean()), 6) if len(correct) else None,
        "n": int(len(correct)),
        "per_class": per_class,
        "correct": correct.tolist(),
    }


def bootstrap_interval(correct, n_boot=2000, seed=0, level=0.95):
    """A percentile bootstrap interval for top-1 from per-sample correctness."""
    c = np.asarray(correct, dtype=np.float64)
    if len(c) == 0:
        return None, None
    rng = np.random.default_rng(seed)
    means = c[rng.integers(0, len(c), size=(n_boot, len(c)))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return round(float(lo), 6), round(float(hi), 6)


def flag_class_drops(before, after, points=0.10):
    """Classes whose accuracy fell by more than ``points``: the rare species a pruning must not hide."""
    flagged = {}
    for name, b in before["per_class"].items():
        a = after["per_class"].get(name)
        if b is not None and a is not None and b - a > points:
            flagged[name] = {"before": b, "after": a}
    return flagged


@torch.no_grad()
def recalibrate_bn(model, loader, device, skipped, max_batches=None):
    """Reset BN running statistics and re-estimate them as a cumulative average over training batches."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative moving average
    model.train()
    for i, (images, _) in enumerate(batches(loader, skipped, device)):
        if max_batches is not None and i >= max_batches:
            break
        if images.shape[0] > 1:  # train-mode BN cannot normalise a batch of one image
            model(images)
    for bn, m in zip(bns, momenta):
        bn.momentum = m
    return model.eval()


def latency_ms(model, image_size, batch_size, device, repeats=20, warmup=3):
    """Median wall time of one forward pass at ``batch_size`` in milliseconds (synchronised on CUDA and MPS)."""
    x = torch.randn(batch_size, 3, image_size, image_size, device=device)
    return round(median_ms(eager_call(model, x), repeats, warmup, synchronizer(device)), 3)


def file_size_mb(path):
    return round(os.path.getsize(path) / 2**20, 3)
