import os

import pytest
from PIL import Image

from mbv3prune import data as D
from mbv3prune import measure, stage
from mbv3prune.errors import PruneError
from tests.helpers import write_images


def test_split_folders(image_folder):
    root = image_folder()
    splits, names = D.discover(root)
    assert names == ["ant", "bee", "moth"] and len(splits["train"]) == 12 and len(splits["val"]) == 6
    assert D.eval_split(splits) == "val"


def test_train_test_layout_holds_out_val(tmp_path):
    for c, name in enumerate(["a", "b"]):
        write_images(tmp_path / "train" / name, 10, seed=c)
        write_images(tmp_path / "test" / name, 3, seed=10 + c)
    splits, _ = D.discover(str(tmp_path), seed=1)
    assert len(splits["val"]) == 2 and len(splits["train"]) == 18 and len(splits["test"]) == 6
    assert not set(splits["val"]) & set(splits["train"])
    assert D.discover(str(tmp_path), seed=1)[0] == splits and D.eval_split(splits) == "test"


def test_stages_split_val_with_the_checkpoints_training_seed(tmp_path):
    for c, name in enumerate(["a", "b"]):
        write_images(tmp_path / "train" / name, 10, seed=c)
    cfg = {"SEED": 0, "DATA_DIR": str(tmp_path)}
    held_out_in_training = D.discover(str(tmp_path), seed=1)[0]["val"]
    assert held_out_in_training != D.discover(str(tmp_path), seed=0)[0]["val"]  # the seeds draw different val
    trained = stage.with_split_seed(cfg, {"config": {"SEED": 1}})  # a baseline train_model.py made with SEED=1
    assert trained["SPLIT_SEED"] == 1 and trained["SEED"] == 0
    assert stage.prepare_data(trained)[0]["val"] == held_out_in_training
    pruned = stage.with_split_seed(cfg, {"config": {"SEED": 0, "SPLIT_SEED": 1}})  # pruned.pt passes it on
    assert stage.prepare_data(pruned)[0]["val"] == held_out_in_training
    for meta in ({}, {"config": {}}, {"config": {"SEED": True}}):  # a plain state_dict, no or odd seed: SEED
        assert stage.with_split_seed(cfg, meta)["SPLIT_SEED"] == 0


def test_statistics_of_images_outside_the_train_split_are_refused(tmp_path):
    for c, name in enumerate(["a", "b"]):
        write_images(tmp_path / "train" / name, 10, seed=c)
    cfg = {"SEED": 0, "SPLIT_SEED": 1, "DATA_DIR": str(tmp_path)}
    splits = stage.prepare_data(cfg)[0]
    own = {"sample": {"files": measure.sample_record(splits["train"][:4], str(tmp_path))[0]}}
    measure.check_sample_in_train(own, splits, cfg, "stats.pt")  # drawn from this train split: accepted
    other = {"sample": {"files": measure.sample_record(splits["val"][:1], str(tmp_path))[0]}}
    with pytest.raises(PruneError, match="stats.pt was captured on images outside this train split"):
        measure.check_sample_in_train(other, splits, cfg, "stats.pt")
    rule = {"SEED": 0, "SAMPLES_PER_CLASS": 4, "SAMPLE_FRACTION": 0.0}
    measure.check_sample_in_train({"sample": {"rule": {**rule, "SPLIT_SEED": 1}}}, splits, cfg, "stats.pt")
    with pytest.raises(PruneError, match="another split seed"):
        measure.check_sample_in_train({"sample": {"rule": rule}}, splits, cfg, "stats.pt")  # older: split at SEED


def test_flat_folder_and_csv(tmp_path):
    for c, name in enumerate(["a", "b"]):
        write_images(tmp_path / "flat" / name, 5, seed=c)
    splits, names = D.discover(str(tmp_path / "flat"))
    assert names == ["a", "b"] and len(splits["train"]) + len(splits["val"]) == 10
    assert {y for _, y in splits["val"]} == {0, 1}
    rows = ["path,label"] + [f"flat/{n}/{i:03d}.png,{n}" for n in "ab" for i in range(5)]
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    splits, names = D.discover(str(tmp_path / "m.csv"))
    assert names == ["a", "b"] and len(splits["train"]) + len(splits["val"]) == 10


@pytest.mark.parametrize(
    "make, fragment",
    [
        (lambda p: None, "does not exist"),
        (lambda p: os.makedirs(p), "is not a data set"),
        (lambda p: os.makedirs(os.path.join(p, "train", "a")), "is empty"),
    ],
)
def test_bad_data_dirs(tmp_path, make, fragment):
    path = str(tmp_path / "d")
    make(path)
    with pytest.raises(PruneError, match=fragment):
        D.discover(path)


def test_class_without_readable_image(tmp_path):
    write_images(tmp_path / "train" / "good", 3, seed=0)
    os.makedirs(tmp_path / "train" / "broken")
    (tmp_path / "train" / "broken" / "x.jpg").write_bytes(b"garbage")
    with pytest.raises(PruneError, match="class folder 'broken'.*none of its first images is readable"):
        D.discover(str(tmp_path))


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "CMYK", "I;16"])
def test_odd_modes_become_rgb(tmp_path, mode):
    write_images(tmp_path, 1, seed=0, mode=mode)
    path = next(os.path.join(tmp_path, f) for f in os.listdir(tmp_path))
    assert D.open_rgb(path).mode == "RGB"


def test_corrupt_and_truncated_images_are_skipped_and_counted(tmp_path):
    write_images(tmp_path / "a", 3, seed=0)
    (tmp_path / "a" / "zz_bad.png").write_bytes(b"\x89PNG garbage")
    good = (tmp_path / "a" / "000.png").read_bytes()
    (tmp_path / "a" / "zz_trunc.png").write_bytes(good[: len(good) // 2])
    items = [(str(tmp_path / "a" / f), 0) for f in sorted(os.listdir(tmp_path / "a"))]
    loader = D.make_loader(items, D.eval_transform(32), batch_size=2)
    skipped = D.Skipped()
    seen = sum(len(y) for _, y in D.batches(loader, skipped))
    assert seen == 3 and skipped.count == 2 and "zz_bad.png" in skipped.summary()


def test_batches_move_the_labels_to_the_device_unless_asked_not_to(tmp_path):
    write_images(tmp_path / "a", 3, seed=0)
    items = [(str(tmp_path / "a" / f), 0) for f in sorted(os.listdir(tmp_path / "a"))]
    loader = D.make_loader(items, D.eval_transform(32), batch_size=2)
    for on_device, where in ((True, "meta"), (False, "cpu")):  # meta: a device other than the CPU, here
        for images, labels in D.batches(loader, D.Skipped(), "meta", labels_on_device=on_device):
            assert images.device.type == "meta" and labels.device.type == where


def test_stage_loaders_pin_their_batches_only_for_a_gpu(monkeypatch):
    monkeypatch.setattr(D.torch.cuda, "is_available", lambda: True)  # a machine with a GPU
    cfg = {"MODEL_ARCH": "mobilenet_v3_small", "IMAGE_SIZE": 32, "BATCH_SIZE": 2, "NUM_WORKERS": 0, "SEED": 0}
    for device, pinned in (("cpu", False), ("auto", True), ("cuda", True)):
        assert stage.loader({**cfg, "DEVICE": device}, [("a.png", 0)]).pin_memory is pinned, device


def test_eval_transform_uses_weights_metadata():
    im = Image.new("RGB", (50, 70), (124, 116, 104))  # about the ImageNet mean
    x = D.eval_transform(32)(im)
    assert x.shape == (3, 32, 32) and x.abs().max() < 0.02


def test_stratified_sample_per_class_covers_single_image_class():
    items = [(f"a{i}", 0) for i in range(10)] + [("b0", 1)] + [(f"c{i}", 2) for i in range(4)]
    s = D.stratified_sample(items, per_class=3, seed=5)
    assert sorted({y for _, y in s}) == [0, 1, 2] and len(s) == 3 + 1 + 3
    assert s == D.stratified_sample(items, per_class=3, seed=5) != D.stratified_sample(items, per_class=3, seed=6)


def test_stratified_sample_fraction_handles_singletons():
    items = [(f"a{i}", 0) for i in range(20)] + [("b0", 1)] + [(f"c{i}", 2) for i in range(10)]
    s = D.stratified_sample(items, fraction=0.5, seed=0)
    assert sorted({y for _, y in s}) == [0, 1, 2] and ("b0", 1) in s
    assert sum(y == 0 for _, y in s) == 10
    with pytest.raises(PruneError, match="SAMPLE_FRACTION"):
        D.stratified_sample(items, fraction=1.5)
