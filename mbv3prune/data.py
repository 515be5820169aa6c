"""Data sets: ImageFolder (with or without split folders) or a CSV manifest; splits, stratified samples, loaders.

Layouts accepted for ``DATA_DIR``:
- ``DATA_DIR/train/<class>/<image>`` with ``val/`` and/or ``test/`` beside it;
- ``DATA_DIR/<class>/<image>`` (a seeded stratified split makes train and val);
- a CSV file ``path,label[,split]`` (paths relative to the CSV's folder).
When there is ``test/`` but no ``val/``, a seeded stratified 10% of ``train/`` is held out as ``val`` to
choose checkpoints, and ``test/`` is kept for final scores. Unreadable images are skipped and counted.
"""

import csv
import os
import warnings
from collections import defaultdict

import numpy as np
import torch
from PIL import Image, ImageFile
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from . import distributed
from .errors import PruneError
from .models import normalization

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")
SPLIT_NAMES = ("train", "val", "test")
VAL_FRACTION = 0.1  # held out of train/ for checkpoint selection when there is no val/
FLAT_VAL_FRACTION = 0.2  # held out of a data set without split folders
ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated image is an error we count, not a half-grey image


def _is_image(name):
    return name.lower().endswith(IMAGE_EXTS) and not name.startswith(".")


def _class_dirs(root):
    return sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and not d.startswith("."))


def _scan_folder(root, class_names):
    """[(path, label)] of the image files under ``root/<class>/`` for the given classes (sorted)."""
    items = []
    for label, name in enumerate(class_names):
        folder = os.path.join(root, name)
        if not os.path.isdir(folder):
            continue
        files = sorted(f for f in os.listdir(folder) if _is_image(f))
        items += [(os.path.join(folder, f), label) for f in files]
    return items


def _read_csv(path):
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise PruneError(f"CSV manifest {path} cannot be read: {err}") from None
    if not rows or not {"path", "label"} <= set(rows[0]):
        raise PruneError(f"CSV manifest {path} needs a header with columns path,label[,split]")
    base = os.path.dirname(os.path.abspath(path))
    class_names = sorted({r["label"] for r in rows})
    splits = defaultdict(list)
    for r in rows:
        split = (r.get("split") or "all").strip()
        splits[split].append((os.path.join(base, r["path"]), class_names.index(r["label"])))
    return dict(splits), class_names


def stratified_split(items, fraction, seed):
    """Split ``items`` per class with a seeded generator: (rest, held_out), every class kept in ``rest``."""
    rng = np.random.default_rng(seed)
    rest, held = [], []
    for label in sorted({y for _, y in items}):
        members = [it for it in items if it[1] == label]
        order = rng.permutation(len(members))
        k = int(round(fraction * len(members))) if len(members) > 1 else 0
        k = min(k, len(members) - 1)
        held += [members[i] for i in sorted(order[:k])]
        rest += [members[i] for i in sorted(order[k:])]
    return rest, held


def discover(data_dir, seed=0):
    """({"train": items, "val": items, "test"?: items}, class_names) for any accepted layout."""
    if not os.path.exists(data_dir):
        raise PruneError(f"DATA_DIR {data_dir} does not exist")
    if os.path.isfile(data_dir):
        if not data_dir.lower().endswith(".csv"):
            raise PruneError(f"DATA_DIR {data_dir} is a file but not a .csv manifest")
        splits, class_names = _read_csv(data_dir)
        if "train" not in splits:
            splits["train"], splits["val"] = stratified_split(splits.pop("all", []), FLAT_VAL_FRACTION, seed)
    elif os.path.isdir(os.path.join(data_dir, "train")):
        class_names = _class_dirs(os.path.join(data_dir, "train"))
        splits = {
            s: _scan_folder(os.path.join(data_dir, s), class_names)
            for s in SPLIT_NAMES
            if os.path.isdir(os.path.join(data_dir, s))
        }
    else:
        class_names = _class_dirs(data_dir)
        splits = {}
        splits["train"], splits["val"] = stratified_split(_scan_folder(data_dir, class_names), FLAT_VAL_FRACTION, seed)
    if "val" not in splits:
        splits["train"], splits["val"] = stratified_split(splits["train"], VAL_FRACTION, seed)
    _check(data_dir, splits, class_names)
    return splits, class_names


def _check(data_dir, splits, class_names):
    if not class_names:
        raise PruneError(
            f"DATA_DIR {data_dir} is not a data set: no class folders (expected <class>/<image> "
            "or train/<class>/<image>, or a path,label CSV)"
        )
    counts = np.bincount([y for _, y in splits["train"]], minlength=len(class_names))
    if counts.sum() == 0:
        raise PruneError(f"DATA_DIR {data_dir} is empty: no image files ({', '.join(IMAGE_EXTS)})")
    for name, n in zip(class_names, counts):
        if n == 0:
            raise PruneError(f"class folder {name!r} in {data_dir} has no image files in the train split")
    for label, name in enumerate(class_names):
        paths = [p for p, y in splits["train"] if y == label]
        if not any(_readable(p) for p in paths[:20]):
            raise PruneError(
                f"class folder {name!r} in {data_dir}: none of its first images is readable (e.g. {paths[0]})"
            )


def _readable(path):
    try:
        with Image.open(path) as im:
            im.verify()
        return True
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return False


def eval_split(splits):
    """The split final scores are reported on: ``test`` when there is one, else ``val``."""
    return "test" if splits.get("test") else "val"


def open_rgb(path):
    """An image as RGB (grayscale, palette, RGBA and CMYK converted); raises OSError when unreadable."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # palette-with-transparency warnings from Pillow
        with Image.open(path) as im:
            im.load()
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                im = im.convert("RGBA")
                background = Image.new("RGBA", im.size, (255, 255, 255, 255))
                return Image.alpha_composite(background, im).convert("RGB")
            return im.convert("RGB")


def eval_transform(image_size, arch="mobilenet_v3_large"):
    """Resize, centre crop to ``image_size``, ImageNet mean and std (from torchvision's weights metadata)."""
    mean, std = normalization(arch)
    return T.Compose(
        [T.Resize(int(round(image_size / 0.875))), T.CenterCrop(image_size), T.ToTensor(), T.Normalize(mean, std)]
    )


def train_transform(image_size, arch="mobilenet_v3_large"):
    """Standard augmentation: random resized crop, horizontal flip, light colour jitter."""
    mean, std = normalization(arch)
    return T.Compose(
        [
            T.RandomResizedCrop(image_size, scale=(0.35, 1.0)),
            T.RandomHorizontalFlip(),
            T.ColorJitter(0.2, 0.2, 0.2),
            T.ToTensor(),
            T.Normalize(mean, std),
        ]
    )


class ImageList(Dataset):
    """(image tensor, label) for a list of (path, label); an unreadable image yields None (skipped, counted)."""

    def __init__(self, items, transform):
        self.items, self.transform = list(items), transform

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        path, label = self.items[i]
        try:
            return self.transform(open_rgb(path)), label, path
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
            return None, label, path


def collate_skipping(batch):
    """Stack the readable samples; pass on the paths of the unreadable ones."""
    good = [b for b in batch if b[0] is not None]
    bad = [b[2] for b in batch if b[0] is None]
    if not good:
        return torch.empty(0), torch.empty(0, dtype=torch.long), bad
    return torch.stack([b[0] for b in good]), torch.tensor([b[1] for b in good]), bad


class Skipped:
    """Counts the unreadable images met while iterating loaders, each file once however often it is met (every
    epoch, BN pass and evaluation), and keeps the first few paths."""

    def __init__(self):
        self.count, self.paths, self._seen = 0, [], set()

    def add(self, paths):
        new = [p for p in dict.fromkeys(paths) if p not in self._seen and p not in self.paths]
        self._seen.update(new)
        self.count += len(new)
        self.paths += new[: max(0, 5 - len(self.paths))]

    def summary(self):
        return f"{self.count} unreadable image(s) skipped" + (f", e.g. {', '.join(self.paths)}" if self.count else "")


def make_loader(
    items, transform, batch_size, num_workers=0, shuffle=False, seed=0, drop_last=False, shard=False, pin_memory=None
):
    """A DataLoader over ``items`` whose batches are (images, labels, unreadable paths); seeded shuffling.

    ``shard``: under torchrun each process reads its own part (a DistributedSampler seeded with ``seed``;
    call ``distributed.set_epoch`` each epoch), and its workers get their own seeds. ``pin_memory``: batches
    in pinned memory, for asynchronous copies to a GPU (None: whenever CUDA is available).
    """
    dataset = ImageList(items, transform)
    part = distributed.sampler(dataset, shuffle, seed, drop_last) if shard else None
    generator = torch.Generator().manual_seed(seed + (distributed.rank() if shard else 0))
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle and part is None,
        sampler=part,
        drop_last=drop_last,
        num_workers=num_workers,
        collate_fn=collate_skipping,
        generator=generator,
        persistent_workers=False,
        worker_init_fn=_seed_worker if num_workers else None,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
    )


def _seed_worker(worker_id):
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    import random

    random.seed(seed)


def batches(loader, skipped, device=None, keep_empty=False, labels_on_device=True):
    """Yield (images, labels) on ``device`` from a make_loader loader, recording unreadable images in ``skipped``.

    A wholly unreadable batch is left out, or (``keep_empty``) yielded empty: under torchrun every rank must
    take part in every step. On CUDA the copies are asynchronous and the images channels_last (the layout
    cuDNN convolves fastest). ``labels_on_device=False`` leaves the labels on the CPU (a capture checks and
    records them there: on a GPU each look at them would wait for the device)."""
    fmt = torch.channels_last if device is not None and torch.device(device).type == "cuda" else torch.preserve_format
    for images, labels, bad in loader:
        skipped.add(bad)
        if not len(labels) and keep_empty:
            yield images, labels
        elif len(labels):
            if device is not None:
                images = images.to(device, non_blocking=True, memory_format=fmt)
                labels = labels.to(device, non_blocking=True) if labels_on_device else labels
            yield images, labels


def stratified_sample(items, per_class=None, fraction=None, seed=0):
    """A sample covering every class: ``per_class`` images per class (all of a smaller class), drawn with a
    seeded generator, or a stratified ``fraction`` (scikit-learn; classes too small to split taken whole)."""
    if (per_class is None) == (fraction is None):
        raise PruneError("give exactly one of SAMPLES_PER_CLASS and SAMPLE_FRACTION")
    if per_class is not None:
        if per_class < 1:
            raise PruneError(f"SAMPLES_PER_CLASS={per_class} must be at least 1")
        rng = np.random.default_rng(seed)
        chosen = []
        for label in sorted({y for _, y in items}):
            members = [it for it in items if it[1] == label]
            pick = sorted(rng.choice(len(members), size=min(per_class, len(members)), replace=False))
            chosen += [members[i] for i in pick]
        return chosen
    return _fraction_sample(items, fraction, seed)


def _fraction_sample(items, fraction, seed):
    from sklearn.model_selection import train_test_split

    if not 0 < fraction <= 1:
        raise PruneError(f"SAMPLE_FRACTION={fraction} must be in (0, 1]")
    counts = defaultdict(int)
    for _, y in items:
        counts[y] += 1
    whole = [it for it in items if counts[it[1]] < 2]  # sklearn refuses classes with a single image
    rest = [it for it in items if counts[it[1]] >= 2]
    if fraction == 1 or not rest:
        return sorted(items, key=lambda it: (it[1], it[0]))
    try:
        chosen, _ = train_test_split(rest, train_size=fraction, stratify=[y for _, y in rest], random_state=seed)
    except ValueError as err:
        raise PruneError(
            f"SAMPLE_FRACTION={fraction} is too small to cover every class ({err}); raise it or use SAMPLES_PER_CLASS"
        ) from None
    return sorted(whole + list(chosen), key=lambda it: (it[1], it[0]))
