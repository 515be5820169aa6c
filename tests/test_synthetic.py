"""The synthetic species set: layout and counts, byte-for-byte determinism, ensure() reuse, atomic replacement,
and that colour alone does not identify a class."""

import hashlib
import os

import numpy as np
import pytest
from PIL import Image

from mbv3prune import synthetic
from mbv3prune.errors import PruneError

SMALL = {"num_classes": 4, "train_per_class": 5, "val_per_class": 3, "size": 32}


def file_hashes(root):
    """{relative path: sha256} of every image under ``root``."""
    out = {}
    for split in synthetic.SPLITS:
        for dirpath, _, files in os.walk(os.path.join(root, split)):
            for name in files:
                path = os.path.join(dirpath, name)
                with open(path, "rb") as f:
                    out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return out


def mtimes(root):
    """{path: mtime_ns} of everything under ``root``."""
    return {os.path.join(d, n): os.stat(os.path.join(d, n)).st_mtime_ns for d, _, files in os.walk(root) for n in files}


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("small") / "species"
    return root, synthetic.generate(root, seed=3, **SMALL)


def test_every_class_in_both_splits_with_the_requested_counts(small_set):
    root, manifest = small_set
    assert manifest["classes"] == sorted(synthetic.CLASSES[: SMALL["num_classes"]])
    for split in synthetic.SPLITS:
        assert sorted(os.listdir(root / split)) == manifest["classes"]
        for name in manifest["classes"]:
            files = os.listdir(root / split / name)
            assert len(files) == SMALL[f"{split}_per_class"] == manifest["counts"][split][name]
            with Image.open(root / split / name / files[0]) as image:
                assert image.mode == "RGB" and image.size == (SMALL["size"], SMALL["size"])
    assert manifest["files"] == len(file_hashes(root))


def test_manifest_hash_covers_every_file(small_set):
    root, manifest = small_set
    hashes = file_hashes(root)
    listing = "".join(f"{rel.replace(os.sep, '/')} {h}\n" for rel, h in sorted(hashes.items()))
    assert manifest["sha256"] == hashlib.sha256(listing.encode()).hexdigest()
    assert synthetic.MANIFEST in os.listdir(root)


def test_png_files_carry_no_metadata_chunks(small_set):
    root, manifest = small_set
    path = root / "val" / manifest["classes"][0] / sorted(os.listdir(root / "val" / manifest["classes"][0]))[0]
    data = path.read_bytes()
    chunks, pos = set(), 8
    while pos < len(data):
        length = int.from_bytes(data[pos : pos + 4], "big")
        chunks.add(data[pos + 4 : pos + 8].decode("ascii"))
        pos += 12 + length
    assert chunks == {"IHDR", "IDAT", "IEND"}


def test_same_seed_gives_byte_identical_files_and_another_seed_differs(small_set, tmp_path):
    root, manifest = small_set
    again = synthetic.generate(tmp_path / "again", seed=3, **SMALL)
    other = synthetic.generate(tmp_path / "other", seed=4, **SMALL)
    assert file_hashes(tmp_path / "again") == file_hashes(root) and again["sha256"] == manifest["sha256"]
    different = file_hashes(tmp_path / "other")
    assert different.keys() == file_hashes(root).keys() and other["sha256"] != manifest["sha256"]
    assert all(different[rel] != h for rel, h in file_hashes(root).items())


def test_each_image_is_independent_of_the_rest_of_the_set(small_set, tmp_path):
    root, _ = small_set
    bigger = {**SMALL, "num_classes": SMALL["num_classes"] + 2, "train_per_class": SMALL["train_per_class"] + 2}
    synthetic.generate(tmp_path / "bigger", seed=3, **bigger)
    big = file_hashes(tmp_path / "bigger")
    assert all(big[rel] == h for rel, h in file_hashes(root).items())
    name = sorted(synthetic.CLASSES[: SMALL["num_classes"]])[1]
    redrawn = synthetic.png_bytes(synthetic.render(name, seed=3, split="train", index=2, size=SMALL["size"]))
    assert redrawn == (root / "train" / name / "0002.png").read_bytes()


def test_ensure_reuses_a_matching_set_without_rewriting(small_set):
    root, manifest = small_set
    before = mtimes(root)
    assert synthetic.ensure(root, seed=3, **SMALL) == manifest
    assert mtimes(root) == before


def test_ensure_regenerates_a_set_whose_manifest_is_missing(tmp_path):
    root = tmp_path / "species"
    first = synthetic.generate(root, seed=1, **SMALL)
    hashes = file_hashes(root)
    os.remove(root / synthetic.MANIFEST)
    os.remove(root / "train" / first["classes"][0] / "0000.png")
    assert synthetic.ensure(root, seed=1, **SMALL) == first
    assert file_hashes(root) == hashes and (root / synthetic.MANIFEST).is_file()


def test_ensure_regenerates_when_the_parameters_change(tmp_path):
    root = tmp_path / "species"
    synthetic.generate(root, seed=1, **SMALL)
    changed = {**SMALL, "val_per_class": SMALL["val_per_class"] + 1}
    manifest = synthetic.ensure(root, seed=1, **changed)
    assert manifest["params"]["val_per_class"] == changed["val_per_class"]
    assert all(len(os.listdir(root / "val" / n)) == changed["val_per_class"] for n in manifest["classes"])


def test_generation_leaves_no_temporary_directory(tmp_path):
    synthetic.generate(tmp_path / "species", seed=0, **SMALL)
    synthetic.generate(tmp_path / "species", seed=1, **SMALL)
    assert os.listdir(tmp_path) == ["species"]


def test_a_failed_generation_keeps_the_previous_set(tmp_path, monkeypatch):
    root = tmp_path / "species"
    manifest = synthetic.generate(root, seed=0, **SMALL)
    hashes = file_hashes(root)

    def broken(class_name, seed, split, index, size):
        if split == "val":
            raise RuntimeError("drawing failed")
        return Image.new("RGB", (size, size))

    monkeypatch.setattr(synthetic, "render", broken)
    with pytest.raises(RuntimeError, match="drawing failed"):
        synthetic.generate(root, seed=5, **SMALL)
    assert file_hashes(root) == hashes and synthetic.ensure(root, seed=0, **SMALL) == manifest
    assert os.listdir(tmp_path) == ["species"]


def test_refuses_to_replace_a_directory_that_is_not_a_generated_set(tmp_path):
    root = tmp_path / "mine"
    root.mkdir()
    (root / "notes.txt").write_text("keep me")
    with pytest.raises(PruneError, match="not a synthetic data set"):
        synthetic.ensure(root, seed=0, **SMALL)
    assert (root / "notes.txt").read_text() == "keep me"


def test_ensure_regenerates_over_a_damaged_manifest(tmp_path):
    root = tmp_path / "species"
    first = synthetic.generate(root, seed=2, **SMALL)
    (root / synthetic.MANIFEST).write_text("{not json")
    assert synthetic.ensure(root, seed=2, **SMALL) == first


def test_render_refuses_an_unknown_class_or_split():
    with pytest.raises(PruneError, match="unknown class 'unicorn'"):
        synthetic.render("unicorn")
    with pytest.raises(PruneError, match="unknown split 'test'"):
        synthetic.render(synthetic.CLASSES[0], split="test")


def test_contact_sheet_has_one_row_per_class(tmp_path):
    path = synthetic.contact_sheet(tmp_path / "sheet.png", num_classes=3, per_class=2, size=24, zoom=1)
    with Image.open(path) as sheet:
        assert sheet.size == (2 * 24, 3 * 24)


@pytest.mark.parametrize(
    "bad",
    [
        {"num_classes": len(synthetic.CLASSES) + 1},
        {"num_classes": 1},
        {"size": 8},
        {"train_per_class": 0},
        {"seed": -1},
        {"val_per_class": 2.5},
    ],
)
def test_bad_parameters_are_refused_with_their_name(tmp_path, bad):
    params = {"seed": 0, **SMALL, **bad}
    name = next(iter(bad))
    with pytest.raises(PruneError, match=name):
        synthetic.generate(tmp_path / "species", **params)
    assert not (tmp_path / "species").exists()


def mean_rgb(root, split, classes):
    """Per-image mean RGB and class index of one split."""
    features, labels = [], []
    for label, name in enumerate(classes):
        for file in sorted(os.listdir(root / split / name)):
            with Image.open(root / split / name / file) as image:
                features.append(np.asarray(image, np.float64).mean(axis=(0, 1)))
            labels.append(label)
    return np.array(features), np.array(labels)


def test_mean_colour_does_not_identify_the_class(tmp_path):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    counts = {"num_classes": 8, "train_per_class": 40, "val_per_class": 20, "size": 32}
    manifest = synthetic.generate(tmp_path / "species", seed=0, **counts)
    x_train, y_train = mean_rgb(tmp_path / "species", "train", manifest["classes"])
    x_val, y_val = mean_rgb(tmp_path / "species", "val", manifest["classes"])

    def score(shift):
        clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
        clf.fit(x_train + shift * y_train[:, None], y_train)
        return clf.score(x_val + shift * y_val[:, None], y_val)

    assert score(0.0) <= 0.40
    assert score(3 * x_train.std()) >= 0.8  # the probe does find colour where colour codes the class
