"""Shared fixtures: tiny image folders, so the suite runs fast on a 2-core CPU (helpers: tests/helpers.py)."""

import pytest

from tests.helpers import write_images


@pytest.fixture
def image_folder(tmp_path):
    """An ImageFolder with train/ and val/, three classes, a few 40-px images each."""

    def make(classes=("ant", "bee", "moth"), n_train=4, n_val=2):
        for c, name in enumerate(classes):
            write_images(tmp_path / "train" / name, n_train, seed=c)
            write_images(tmp_path / "val" / name, n_val, seed=100 + c)
        return str(tmp_path)

    return make


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """Three classes, 6 train and 3 val images each, 40 px: enough for every stage at 32 px."""
    root = tmp_path_factory.mktemp("tiny_data")
    for c, name in enumerate(["ant", "bee", "moth"]):
        write_images(root / "train" / name, 6, seed=c)
        write_images(root / "val" / name, 3, seed=100 + c)
    return str(root)
