"""Training and fine-tuning: AdamW, cosine schedule with warm-up, label smoothing, BN re-estimated per epoch.

torchvision's MobileNetV3 BN layers use momentum 0.01: after a short run their running statistics lag
far behind the weights and the model collapses in eval mode. So before every validation the BN
statistics are re-estimated on training batches (cumulative average), and validation is in eval mode,
the mode the model is used in.
"""
import copy
import math
import random

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from .data import Skipped, batches
from .evaluate import accuracy, recalibrate_bn


def seed_everything(seed):
    """Seed Python, numpy and torch (CPU and CUDA) once."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def cosine_lr(step, total, warmup, base_lr):
    """Linear warm-up, then cosine decay to zero."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    return 0.5 * base_lr * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def train_one_epoch(model, loader, optimizer, step, total_steps, warmup, lr, label_smoothing, device, skipped, desc):
    """One epoch of training; returns (mean loss, next step)."""
    model.train()
    loss_fn = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    losses = []
    bar = tqdm(batches(loader, skipped, device), total=len(loader), desc=desc, leave=False, disable=None)
    for images, labels in bar:
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, total_steps, warmup, lr)
        loss = loss_fn(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        step += 1
    return float(np.mean(losses)) if losses else float("nan"), step


def fit(model, loaders, class_names, device, epochs, lr=2e-3, weight_decay=0.05, label_smoothing=0.1,
        warmup_epochs=1, bn_batches=20, log=print):
    """Train ``model`` and keep the weights with the best eval-mode val top-1.

    ``loaders``: {"train": augmented, "bn": un-augmented training batches, "val": validation}.
    Returns (best model, history: one dict per epoch).
    """
    model.to(device)
    skipped = Skipped()
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=lr)
    total = epochs * len(loaders["train"])
    warmup = min(warmup_epochs * len(loaders["train"]), total // 2)
    best, best_acc, history, step = copy.deepcopy(model.state_dict()), -1.0, [], 0
    for epoch in range(1, epochs + 1):
        loss, step = train_one_epoch(model, loaders["train"], optimizer, step, total, warmup, lr, label_smoothing,
                                     device, skipped, f"epoch {epoch}/{epochs}")
        recalibrate_bn(model, loaders["bn"], device, skipped, max_batches=bn_batches)
        val = accuracy(model, loaders["val"], device, class_names, skipped, desc="val")
        history.append({"epoch": epoch, "train_loss": round(loss, 6), "val_top1": val["top1"]})
        log(f"epoch {epoch:3d}/{epochs}  loss {loss:.4f}  val top-1 {val['top1']:.4f}")
        if val["top1"] > best_acc:
            best_acc, best = val["top1"], copy.deepcopy(model.state_dict())
    model.load_state_dict(best)
    if skipped.count:
        log(skipped.summary())
    return model.eval(), history
