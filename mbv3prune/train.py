"""Training and fine-tuning: AdamW, cosine schedule with warm-up, label smoothing, BN re-estimated per epoch.

torchvision's MobileNetV3 BN layers use momentum 0.01: after a short run their running statistics lag
far behind the weights and the model collapses in eval mode. So before every validation the BN
statistics are re-estimated on training batches (cumulative average), and validation is in eval mode,
the mode the model is used in.

Under torchrun the model trains as DistributedDataParallel: each process reads its own part of the training
set (a DistributedSampler) at the loader's batch size, and the gradients are averaged, so N processes at
batch B take the steps one process takes at batch N x B. BN layers normalise with each process's own batch
(no SyncBatchNorm: with tiny per-GPU batches use ``freeze_bn``). BN re-estimation and validation run on the
same, unsharded batches in every process, so every process keeps identical weights and chooses the same
best epoch without communicating. The BN batches are N x B images, as one process at N x B reads: train-mode
BN statistics depend on the batch size, and with ``freeze_bn`` the next epoch trains with them. On CUDA,
``amp`` trains under autocast (bf16 where supported, else fp16 with loss scaling).
"""

import contextlib
import copy
import math
import random

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from . import distributed
from .data import Skipped, batches
from .evaluate import accuracy, recalibrate_bn

LOSS_SHOWN_EVERY = 10  # steps between the progress bar's loss readings (on a GPU each read waits for it)


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


def freeze_bn_layers(model):
    """Put the BN layers in eval mode: they normalise with their running statistics and do not update them."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def is_head(name):
    """Whether parameter ``name`` belongs to the classifier head (what a transfer replaces and trains first)."""
    return name.startswith("classifier.")


def set_backbone_frozen(model, frozen):
    """Backbone parameters (all but the classifier head) stop (``frozen``) or resume receiving gradients.

    With ``frozen``, also train with the BN layers in eval mode: MobileNetV3 has BN in the backbone only."""
    for name, p in model.named_parameters():
        if not is_head(name):
            p.requires_grad_(not frozen)
    return model


def param_groups(model, weight_decay, backbone_lr_scale=1.0):
    """AdamW parameter groups: weight decay on weights, not on biases and BN; each group's ``lr_scale`` (the
    schedule's learning rate is multiplied by it) is ``backbone_lr_scale`` for the backbone, 1 for the head.

    With ``backbone_lr_scale=1`` these are the two groups (decay, no decay) in parameter order."""
    groups = {}
    for name, p in model.named_parameters():
        scale = 1.0 if is_head(name) else float(backbone_lr_scale)
        decay = weight_decay if p.ndim > 1 else 0.0
        groups.setdefault((scale, decay), []).append(p)
    return [{"params": ps, "weight_decay": decay, "lr_scale": scale} for (scale, decay), ps in groups.items()]


def mixed_precision(device, amp):
    """(autocast context, GradScaler or None): autocast on CUDA only, bf16 where supported, else fp16 + scaler."""
    if not (amp and device.type == "cuda"):
        return contextlib.nullcontext(), None
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    return torch.autocast("cuda", dtype=dtype), scaler


def _step(loss, optimizer, scaler):
    optimizer.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
        optimizer.step()
    else:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()


def _substitute(images, size, device):
    """Two black images at ``size``: the zero-weight batch of a rank whose own batch was wholly unreadable."""
    fmt = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    return torch.zeros(2, 3, *size, device=device).contiguous(memory_format=fmt), torch.zeros(
        2, dtype=torch.long, device=device
    )


def _step_loss(model, images, labels, loss_fn, device, autocast):
    """(loss to back-propagate, this rank's mean loss or None); None when no rank has an image in this step.

    The loss is this rank's summed loss x world / images of all ranks, so DDP's equal-weight gradient
    average is the mean over every image of the step however unequal the ranks' batches. A rank without an
    image runs a zero-weight substitute batch, so that every rank takes part in every gradient all-reduce.
    The mean loss is a float32 tensor on the device (MPS has no float64): reading it at every step would
    wait for a GPU.
    """
    total, h, w = distributed.step_batches(images)
    if total == 0:
        return None, None
    own = len(labels) > 0
    if not own:
        images, labels = _substitute(images, (h, w), device)
    with autocast:
        summed = loss_fn(model(images), labels)
    weight = distributed.world_size() / total if own else 0.0
    return summed * weight, summed.detach().float() / len(labels) if own else None


def train_one_epoch(
    model,
    loader,
    optimizer,
    step,
    total_steps,
    warmup,
    lr,
    label_smoothing,
    device,
    skipped,
    desc,
    freeze_bn=False,
    precision=None,
):
    """One epoch of training; returns (mean loss over all processes, next step).

    ``freeze_bn``: BN layers in eval mode. ``precision``: ``mixed_precision``'s pair (None: full precision).
    Under torchrun the ranks skip together a step for which no rank has a readable image.
    """
    model.train()
    if freeze_bn:
        freeze_bn_layers(model)
    autocast, scaler = precision or (contextlib.nullcontext(), None)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=label_smoothing, reduction="sum")
    loss_sum, loss_steps = 0.0, 0  # this rank's step losses summed on the device, read once at the end
    bar = tqdm(
        batches(loader, skipped, device, keep_empty=True),
        total=len(loader),
        desc=desc,
        leave=False,
        disable=None if distributed.is_main() else True,
    )
    for images, labels in bar:
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, total_steps, warmup, lr) * group.get("lr_scale", 1.0)
        loss, own = _step_loss(model, images, labels, loss_fn, device, autocast)
        step += 1
        if loss is None:
            continue
        _step(loss, optimizer, scaler)
        if own is not None:
            loss_sum, loss_steps = loss_sum + own, loss_steps + 1
            if not bar.disable and loss_steps % LOSS_SHOWN_EVERY == 1:
                bar.set_postfix(loss=f"{float(own):.3f}")
    return distributed.mean(float(loss_sum) / loss_steps if loss_steps else float("nan")), step


def fit(
    model,
    loaders,
    class_names,
    device,
    epochs,
    lr=2e-3,
    weight_decay=0.05,
    label_smoothing=0.1,
    warmup_epochs=1,
    bn_batches=20,
    log=print,
    freeze_bn=False,
    amp=False,
    freeze_backbone_epochs=0,
    backbone_lr_scale=1.0,
):
    """Train ``model`` and keep the weights with the best eval-mode val top-1.

    ``loaders``: {"train": augmented, "bn": un-augmented training batches, "val": validation}; under torchrun
    "train" is sharded (``stage.loader(..., train=True)``), "bn" and "val" are not; N processes read "bn" at
    N x its batch size. ``freeze_bn``: BN layers stay in eval mode while training. ``amp``: autocast on CUDA.
    The transfer recipe: the first ``freeze_backbone_epochs`` train the classifier head alone (backbone frozen,
    its BN in eval mode and not re-estimated), and the backbone learns at ``backbone_lr_scale`` x the
    schedule's rate.
    Returns (best model, history: one dict per epoch).
    """
    model.to(device)
    if freeze_backbone_epochs:
        set_backbone_frozen(model, True)
    net = distributed.wrap(model, device)
    distributed.seed_ranks()
    skipped = Skipped()
    optimizer = torch.optim.AdamW(param_groups(model, weight_decay, backbone_lr_scale), lr=lr)
    precision = mixed_precision(device, amp)
    total = epochs * len(loaders["train"])
    warmup = min(warmup_epochs * len(loaders["train"]), total // 2)
    bn_loader = distributed.global_batches(loaders["bn"])  # N processes re-estimate as one at N x the batch
    best, best_acc, history, step = copy.deepcopy(model.state_dict()), -1.0, [], 0
    for epoch in range(1, epochs + 1):
        frozen = epoch <= freeze_backbone_epochs
        if freeze_backbone_epochs and epoch == freeze_backbone_epochs + 1:
            net = distributed.wrap(set_backbone_frozen(model, False), device)  # DDP registers the new grads
        distributed.set_epoch(loaders["train"], epoch)
        loss, step = train_one_epoch(
            net,
            loaders["train"],
            optimizer,
            step,
            total,
            warmup,
            lr,
            label_smoothing,
            device,
            skipped,
            f"epoch {epoch}/{epochs}",
            freeze_bn or frozen,
            precision,
        )
        if not frozen:
            recalibrate_bn(model, bn_loader, device, skipped, max_batches=bn_batches)
        val = accuracy(model, loaders["val"], device, class_names, skipped, desc="val")
        history.append(
            {
                "epoch": epoch,
                "train_loss": round(loss, 6),
                "val_top1": val["top1"],
                **({"backbone_frozen": True} if frozen else {}),
            }
        )
        log(f"epoch {epoch:3d}/{epochs}  loss {loss:.4f}  val top-1 {val['top1']:.4f}" + ("  head only" * frozen))
        if val["top1"] > best_acc:
            best_acc, best = val["top1"], copy.deepcopy(model.state_dict())
    model.load_state_dict(best)
    if freeze_backbone_epochs:
        set_backbone_frozen(model, False)
    if skipped.count:
        log(skipped.summary())
    return model.eval(), history
