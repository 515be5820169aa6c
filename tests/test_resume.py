"""A capture interrupted after wholly unreadable batches resumes to exactly the uninterrupted result."""

import os

import pytest
import torch

from mbv3prune import measure, partial
from mbv3prune.blocks import find_blocks
from tests.helpers import randomized_model, write_images

ARCH = "mobilenet_v3_small"


class Interrupted(Exception):
    pass


@pytest.fixture
def items(tmp_path):
    """Two unreadable images first (a wholly unreadable batch at BATCH_SIZE=2), then eight readable ones."""
    write_images(tmp_path / "img", 8, seed=0, size=32)
    for name in ("bad0.png", "bad1.png"):
        (tmp_path / "img" / name).write_bytes(b"not an image")
    good = sorted(p for p in os.listdir(tmp_path / "img") if not p.startswith("bad"))
    return [(str(tmp_path / "img" / p), i % 3) for i, p in enumerate(["bad0.png", "bad1.png", *good])]


def config(run_dir, resume):
    return {
        "RUN_DIR": str(run_dir),
        "RESUME": resume,
        "BATCH_SIZE": 2,
        "SAVE_EVERY": 1,
        "THRESHOLD": 2.0**-7,
        "CAPTURE_POINT": "project_input",
        "MODEL_ARCH": ARCH,
        "IMAGE_SIZE": 32,
        "NUM_WORKERS": 0,
        "SEED": 0,
    }


def capture(run_dir, items, resume=False):
    model = randomized_model(ARCH)
    return measure.run_capture(
        config(run_dir, resume), model, find_blocks(model), items, 3, torch.device("cpu"), {"sample_sha256": "test"}
    )


def test_resume_after_an_unreadable_batch_counts_items_and_keeps_the_skipped(tmp_path, items, monkeypatch):
    want, _, want_skipped = capture(tmp_path / "whole", items)
    save, saves = partial.save_tensors, []

    def save_then_stop(path, tensors):  # killed after the second partial save: 3 loader batches consumed
        save(path, tensors)
        saves.append(path)
        if len([p for p in saves if p.endswith(measure.PARTIAL)]) == 2:
            raise Interrupted

    monkeypatch.setattr(partial, "save_tensors", save_then_stop)
    with pytest.raises(Interrupted):
        capture(tmp_path / "run", items)
    monkeypatch.setattr(partial, "save_tensors", save)
    got, _, skipped = capture(tmp_path / "run", items, resume=True)
    assert (skipped.count, skipped.paths) == (want_skipped.count, want_skipped.paths) == (2, [items[0][0], items[1][0]])
    assert got.keys() == want.keys()
    for key, value in want.items():
        if value.dtype.is_floating_point:
            torch.testing.assert_close(got[key], value, rtol=1e-6, atol=1e-9, msg=key)
        else:  # every image counted once: the images after the unreadable batch are not added twice
            assert torch.equal(got[key], value), key


def _base_and_rows(run_dir, num_classes, labels):
    """(base file bytes, rows file bytes) of one partial save after a batch of two images with ``labels``."""
    model = randomized_model(ARCH)
    saves = partial.PartialSaves(str(run_dir / measure.PARTIAL), num_classes)
    batch = [(torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)), torch.tensor(labels))]

    def on_batch(i, live):
        saves.touch(batch[0][1])
        saves.save(live, 2, measure.Skipped())

    measure.C.capture(model, batch, find_blocks(model), num_classes=num_classes, progress=False, on_batch=on_batch)
    return (
        os.path.getsize(run_dir / measure.PARTIAL),
        os.path.getsize(str(run_dir / measure.PARTIAL) + ".rows00001.pt"),
    )


def test_a_partial_save_costs_the_same_for_10_or_1000_classes(tmp_path):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    few, many = _base_and_rows(tmp_path / "a", 10, [1, 7]), _base_and_rows(tmp_path / "b", 1000, [1, 700])
    assert abs(few[0] - many[0]) < 64 and abs(few[1] - many[1]) < 64, (few, many)
    state, done, _, _ = partial.load(str(tmp_path / "b" / measure.PARTIAL))
    layer = next(k for k in state if k.endswith("/hist_class"))
    assert done == 2 and state[layer].shape[0] == 1000 and state[layer][[1, 700]].sum() > 0
    assert state[layer].sum() == state[layer][[1, 700]].sum()
