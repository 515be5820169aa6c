"""What every stage script does the same way: data set up, loaders, summary tables, the closing lines."""

import os

from . import data as D
from . import distributed, models
from .errors import PruneError

DEMO_DATA_DIR = "data/synthetic-species"  # the embedded demo set, generated on first use


def with_split_seed(cfg, meta):
    """``cfg`` with SPLIT_SEED: the seed of the checkpoint's own train / val split (the SPLIT_SEED, else the SEED,
    its recorded config holds; else SEED). A val split drawn with another seed than the model's training would
    hold images it was trained on, and every choice made on val (BN_RECALIBRATE=auto, ridges) would be biased."""
    recorded = (meta or {}).get("config") or {}
    seed = recorded.get("SPLIT_SEED", recorded.get("SEED"))
    seed = seed if isinstance(seed, int) and not isinstance(seed, bool) else cfg["SEED"]
    if seed != cfg["SEED"]:
        print(f"train / val split drawn with the checkpoint's training seed {seed} (SEED={cfg['SEED']})")
    return {**cfg, "SPLIT_SEED": seed}


def split_seed(cfg):
    """The seed train / val are split with: SPLIT_SEED (``with_split_seed``), else SEED."""
    return cfg.get("SPLIT_SEED", cfg["SEED"])


def prepare_data(cfg):
    """(splits, class_names) of ``DATA_DIR``, split with SPLIT_SEED (``with_split_seed``) else SEED; the demo set
    is generated first when it is the one asked for (under torchrun by rank 0, while the other ranks wait)."""
    if os.path.normpath(cfg["DATA_DIR"]) == os.path.normpath(DEMO_DATA_DIR):
        from .synthetic import ensure

        if distributed.is_main():
            ensure(DEMO_DATA_DIR)
        distributed.barrier()
    return D.discover(cfg["DATA_DIR"], seed=split_seed(cfg))


def checkpoint_data(cfg, meta):
    """(cfg with SPLIT_SEED, splits, class_names) for a checkpoint: DATA_DIR split with the checkpoint's own
    training seed (``with_split_seed``), refused when it does not have the checkpoint's classes."""
    cfg = with_split_seed(cfg, meta)
    splits, class_names = prepare_data(cfg)
    check_class_names(meta, class_names, cfg["DATA_DIR"])
    return cfg, splits, class_names


def loader(cfg, items, train=False, shuffle=False, arch=None, augment=None):
    """A loader over ``items`` with the eval transform at ``IMAGE_SIZE``, or a training loader (``train``): it
    drops a last partial batch, augments unless ``augment=False``, and under torchrun reads only this
    process's part of ``items`` (a DistributedSampler). Batches are pinned only when ``DEVICE`` is a GPU."""
    arch = arch or cfg["MODEL_ARCH"]
    augment = train if augment is None else augment
    transform = D.train_transform(cfg["IMAGE_SIZE"], arch) if augment else D.eval_transform(cfg["IMAGE_SIZE"], arch)
    drop_last = train and len(items) > cfg["BATCH_SIZE"] * distributed.world_size()
    return D.make_loader(
        items,
        transform,
        cfg["BATCH_SIZE"],
        cfg["NUM_WORKERS"],
        shuffle=shuffle,
        seed=cfg["SEED"],
        drop_last=drop_last,
        shard=train,
        pin_memory=models.pick_device(cfg.get("DEVICE", "auto")).type == "cuda",
    )


def check_class_names(meta, class_names, data_dir):
    """The checkpoint must classify the data set's classes (names when recorded, else the count)."""
    names = meta["class_names"]
    if len(names) != len(class_names):
        raise PruneError(
            f"checkpoint {meta['path']} has {len(names)} classes but DATA_DIR {data_dir} has {len(class_names)}"
        )
    if meta.get("format") != "state_dict" and list(names) != list(class_names):
        raise PruneError(
            f"checkpoint {meta['path']} was trained on classes {names[:4]}..., "
            f"DATA_DIR {data_dir} has {class_names[:4]}..."
        )


def table(rows, headers):
    """A plain-text table: one header line, one line per row, columns padded."""
    cells = [[str(h) for h in headers]] + [[_fmt(v) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    numeric = [all(isinstance(r[i], (int, float)) or r[i] is None for r in rows) for i in range(len(headers))]
    lines = [
        "  ".join(c.rjust(w) if num else c.ljust(w) for c, w, num in zip(r, widths, numeric)).rstrip() for r in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
    if isinstance(v, int) and not isinstance(v, bool) and abs(v) >= 1e5:
        return f"{v:,}"
    return "-" if v is None else str(v)


def finish(wrote, next_command=None):
    """The closing lines of a stage: what it wrote and what to run next."""
    print("\nwrote:")
    for path in wrote:
        print(f"  {path}")
    if next_command:
        print(f"next:\n  {next_command}")
