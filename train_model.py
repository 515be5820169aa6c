"""Train or fine-tune a torchvision MobileNetV3 on an ImageFolder data set: the baseline the stages prune.

Reads:  DATA_DIR (ImageFolder with train/ and val/ or test/, a flat ImageFolder, or a path,label CSV);
        CHECKPOINT to start from ("" = random init; "imagenet" = torchvision weights from the local cache;
        or any checkpoint the project loads — its classifier is replaced when the class count differs).
        The transfer recipe: FREEZE_BACKBONE_EPOCHS train the classifier head alone first (backbone frozen, its
        BN in eval mode), and the backbone learns at BACKBONE_LR_SCALE x LR; the starting checkpoint's path and
        sha256 are recorded in baseline.pt ("extra": "init_checkpoint") and train_metrics.json's provenance.
Writes: RUN_DIR/baseline.pt (the best eval-mode val checkpoint, loads with weights_only=True),
        RUN_DIR/train_metrics.json (per-epoch loss and val top-1, final val/test scores, provenance).
A baseline whose recorded config and data fingerprint match is reused instead of trained again.
Under torchrun the model trains as DistributedDataParallel, one process per GPU: each reads its own part of
the training set, BATCH_SIZE is per process, and rank 0 alone logs and writes (see mbv3prune/train.py).

    python train_model.py --DATA_DIR=../shared/data/oxford-flowers12 --RUN_DIR=runs/flowers --IMAGE_SIZE=128
    torchrun --nproc_per_node=4 train_model.py --DATA_DIR=../shared/data/oxford-flowers12 --RUN_DIR=runs/flowers
"""

import hashlib
import os
import time

from torch import nn

from mbv3prune import config, distributed, models, stage
from mbv3prune.artifacts import provenance, read_json, record_timings, sha256_file, write_json
from mbv3prune.data import Skipped, eval_split
from mbv3prune.errors import PruneError
from mbv3prune.evaluate import accuracy
from mbv3prune.train import fit, seed_everything

# -----------------------------------------------------------------------------
DATA_DIR = "data/synthetic-species"  # data set: ImageFolder (train/ + val/ or test/), flat ImageFolder, or CSV
RUN_DIR = "runs/demo"  # where every stage reads and writes its artifacts
MODEL_ARCH = "mobilenet_v3_large"  # mobilenet_v3_large or mobilenet_v3_small
CHECKPOINT = ""  # start from this checkpoint ("" = random init, "imagenet" = torchvision weights from the cache)
FREEZE_BACKBONE_EPOCHS = 0  # transfer: the first N epochs train only the classifier head (backbone and its BN frozen)
BACKBONE_LR_SCALE = 1.0  # transfer: the backbone's learning rate is LR x this (the head's is LR)
ALLOW_PICKLE = False  # allow CHECKPOINT to be a whole-model pickle (runs code from the file: only if you trust it)
IMAGE_SIZE = 64  # training and evaluation resolution in pixels
BATCH_SIZE = 64  # images per batch and process (torchrun with N processes trains at N x BATCH_SIZE)
NUM_WORKERS = 2  # data-loading worker processes
DEVICE = "auto"  # auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps
SEED = 0  # seeds weights, augmentation, splits and shuffling
EPOCHS = 16  # training epochs
LR = 2e-3  # peak AdamW learning rate (cosine decay after WARMUP_EPOCHS)
WEIGHT_DECAY = 0.05  # AdamW weight decay (not on biases and BN)
LABEL_SMOOTHING = 0.1  # cross-entropy label smoothing
WARMUP_EPOCHS = 1  # linear learning-rate warm-up
BN_BATCHES = 20  # training batches used to re-estimate BN statistics before each validation
FREEZE_BN = False  # keep BN layers in eval mode while training (running statistics: for tiny per-GPU batches)
AUGMENT = True  # augment training images (random resized crop, flip, colour jitter); False: the eval transform
DROPOUT = 0.2  # dropout before the classifier's last layer (torchvision's default)
AMP = True  # on CUDA, train under autocast (bf16 where supported, else fp16 with loss scaling); no effect on CPU
REUSE = True  # reuse RUN_DIR/baseline.pt when its config and data fingerprint are unchanged
DEBUG = False  # show tracebacks of the project's errors
# -----------------------------------------------------------------------------
RUN_ONLY = ("NUM_WORKERS", "DEVICE", "AMP", "REUSE", "DEBUG")  # constants that do not change the result
ADDED_LATER = {
    "FREEZE_BN": False,
    "AUGMENT": True,
    "DROPOUT": 0.2,
    "FREEZE_BACKBONE_EPOCHS": 0,
    "BACKBONE_LR_SCALE": 1.0,
}  # how baselines older than these were trained


def check_config(cfg):
    if not 0 <= cfg["DROPOUT"] < 1:
        raise PruneError(f"DROPOUT={cfg['DROPOUT']} must lie in [0, 1)")
    if not 0 <= cfg["FREEZE_BACKBONE_EPOCHS"] <= cfg["EPOCHS"]:
        raise PruneError(
            f"FREEZE_BACKBONE_EPOCHS={cfg['FREEZE_BACKBONE_EPOCHS']} must lie in [0, EPOCHS={cfg['EPOCHS']}]"
        )
    if cfg["FREEZE_BACKBONE_EPOCHS"] and not cfg["CHECKPOINT"]:
        raise PruneError(
            f"FREEZE_BACKBONE_EPOCHS={cfg['FREEZE_BACKBONE_EPOCHS']} needs a CHECKPOINT to start from: "
            "a randomly initialised backbone would stay random"
        )
    if cfg["BACKBONE_LR_SCALE"] < 0:
        raise PruneError(f"BACKBONE_LR_SCALE={cfg['BACKBONE_LR_SCALE']} must be >= 0")


def data_fingerprint(splits):
    """sha256 over every (path, size) of the data set: changes when files are added, removed or rewritten."""
    h = hashlib.sha256()
    for split in sorted(splits):
        for path, label in splits[split]:
            h.update(f"{split}\t{label}\t{os.path.normpath(path)}\t{os.path.getsize(path)}\n".encode())
    return h.hexdigest()


def init_checkpoint(cfg):
    """{"path", "sha256"} of the file CHECKPOINT names (ImageNet: the cached weights), or None for random init."""
    if not cfg["CHECKPOINT"]:
        return None
    path = models.imagenet_weights_path(cfg["MODEL_ARCH"])[0] if cfg["CHECKPOINT"] == "imagenet" else cfg["CHECKPOINT"]
    if not os.path.isfile(path):
        return None  # initial_model names the missing file
    return {"path": path, "sha256": sha256_file(path)}


def reusable(path, cfg, fingerprint, start):
    """True when ``path`` is a baseline trained with this config, on this data, from this starting checkpoint
    (``start``: init_checkpoint's record), by as many processes."""
    if not (cfg["REUSE"] and os.path.exists(path)):
        return False
    _, meta = models.load_checkpoint(path)
    same_config = {k: v for k, v in {**ADDED_LATER, **meta["config"]}.items() if k not in RUN_ONLY} == {
        k: v for k, v in cfg.items() if k not in RUN_ONLY
    }
    same_start = (meta["extra"].get("init_checkpoint") or {}).get("sha256") == (start or {}).get("sha256")
    return (
        same_config
        and same_start
        and meta["extra"].get("data_fingerprint") == fingerprint
        and meta["extra"].get("processes", 1) == distributed.world_size()
    )


def initial_model(cfg, num_classes):
    """Random init, or CHECKPOINT with its classifier replaced when the class count differs; DROPOUT set."""
    if not cfg["CHECKPOINT"]:
        return set_dropout(models.build_model(cfg["MODEL_ARCH"], num_classes), cfg["DROPOUT"])
    model, meta = models.load_checkpoint(cfg["CHECKPOINT"], cfg["MODEL_ARCH"], cfg["ALLOW_PICKLE"])
    head = models.head(model)
    if head.out_features != num_classes:
        print(
            f"replacing the {head.out_features}-class classifier of {cfg['CHECKPOINT']} with a {num_classes}-class one"
        )
        models.set_head(model, nn.Linear(head.in_features, num_classes))
    return set_dropout(model, cfg["DROPOUT"])


def set_dropout(model, p):
    for m in model.classifier.modules():
        if isinstance(m, nn.Dropout):
            m.p = p
    return model


def main(cfg):
    t0 = time.perf_counter()
    check_config(cfg)
    device = distributed.setup(cfg["DEVICE"])
    splits, class_names = stage.prepare_data(cfg)
    out = os.path.join(cfg["RUN_DIR"], "baseline.pt")
    fingerprint, start = data_fingerprint(splits), init_checkpoint(cfg)
    if distributed.from_main(lambda: reusable(out, cfg, fingerprint, start)):
        if distributed.is_main():
            metrics = read_json(os.path.join(cfg["RUN_DIR"], "train_metrics.json"), "training metrics")
            print(
                f"reusing {out}: same config and data (val top-1 {metrics['val']['top1']:.4f}); --REUSE=False retrains"
            )
            stage.finish([out], f"python get_model_architecture.py --RUN_DIR={cfg['RUN_DIR']}")
        return
    seed_everything(cfg["SEED"])
    model = models.to_device(initial_model(cfg, len(class_names)), device)
    world = distributed.world_size()
    print(
        f"training {cfg['MODEL_ARCH']} on {cfg['DATA_DIR']}: {len(class_names)} classes, "
        f"{len(splits['train'])} train / {len(splits['val'])} val images, {cfg['IMAGE_SIZE']} px, {device}"
        + (f", {world} processes x {cfg['BATCH_SIZE']} images per batch" if world > 1 else "")
    )
    loaders = {
        "train": stage.loader(cfg, splits["train"], train=True, shuffle=True, augment=cfg["AUGMENT"]),
        "bn": stage.loader(cfg, splits["train"], shuffle=True),
        "val": stage.loader(cfg, splits["val"]),
    }
    model, history = fit(
        model,
        loaders,
        class_names,
        device,
        cfg["EPOCHS"],
        cfg["LR"],
        cfg["WEIGHT_DECAY"],
        cfg["LABEL_SMOOTHING"],
        cfg["WARMUP_EPOCHS"],
        cfg["BN_BATCHES"],
        freeze_bn=cfg["FREEZE_BN"],
        amp=cfg["AMP"],
        freeze_backbone_epochs=cfg["FREEZE_BACKBONE_EPOCHS"],
        backbone_lr_scale=cfg["BACKBONE_LR_SCALE"],
    )
    if not distributed.is_main():
        return  # identical weights on every process: rank 0 scores and saves them
    skipped = Skipped()
    scores = {"val": accuracy(model, loaders["val"], device, class_names, skipped)}
    final = eval_split(splits)
    if final != "val":
        scores[final] = accuracy(model, stage.loader(cfg, splits[final]), device, class_names, skipped)
    for s in scores.values():
        s.pop("correct")
    models.save_checkpoint(
        out,
        model,
        cfg["MODEL_ARCH"],
        class_names,
        cfg,
        extra={
            "data_fingerprint": fingerprint,
            "val_top1": scores["val"]["top1"],
            "processes": world,
            "init_checkpoint": start,
        },
    )
    metrics_path = write_json(
        os.path.join(cfg["RUN_DIR"], "train_metrics.json"),
        {
            "history": history,
            **scores,
            "class_names": class_names,
            "provenance": provenance(cfg, {"init_checkpoint": start["path"]} if start else None),
        },
    )
    record_timings(cfg["RUN_DIR"], "train_model", {"seconds": time.perf_counter() - t0, "processes": world})
    print(
        "\n"
        + stage.table(
            [
                [name, s["top1"], s["n"], min(v for v in s["per_class"].values() if v is not None)]
                for name, s in scores.items()
            ],
            ["split", "top-1", "images", "worst class"],
        )
    )
    stage.finish([out, metrics_path], f"python get_model_architecture.py --RUN_DIR={cfg['RUN_DIR']}")


if __name__ == "__main__":
    config.run(main, globals())
