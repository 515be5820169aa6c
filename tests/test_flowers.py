"""Integration on the real flower photos in ../shared (skipped when they are absent)."""

import os

import pytest

from mbv3prune import capture
from mbv3prune import data as D
from mbv3prune.blocks import find_blocks
from mbv3prune.models import build_model
from tests.helpers import FLOWERS

pytestmark = pytest.mark.skipif(not os.path.isdir(FLOWERS), reason="../shared/data/oxford-flowers12 is absent")


def test_flower_splits_hold_out_val_and_keep_test():
    splits, names = D.discover(FLOWERS, seed=0)
    assert len(names) == 12 and "sunflower" in names
    assert len(splits["test"]) == 240 and len(splits["train"]) + len(splits["val"]) == 720
    assert all(sum(y == k for _, y in splits["val"]) == 6 for k in range(12))
    assert D.eval_split(splits) == "test"


def test_stratified_capture_covers_every_species():
    splits, names = D.discover(FLOWERS, seed=0)
    items = D.stratified_sample(splits["train"], per_class=2, seed=0)
    model = build_model("mobilenet_v3_small", len(names)).eval()
    loader = D.make_loader(items, D.eval_transform(32, "mobilenet_v3_small"), batch_size=8)
    skipped = D.Skipped()
    stats, layers = capture.capture(
        model, D.batches(loader, skipped), find_blocks(model), num_classes=12, progress=False
    )
    layer = next(iter(layers))
    assert skipped.count == 0 and stats[f"{layer}/n_class"].tolist() == [2] * 12
