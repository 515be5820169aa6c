"""benchmarks/transfer.py end to end on tiny generated species: views without copies, three models, resumable."""
import csv
import json
import os

import pytest

from tests.conftest import ROOT, run_stage, write_images

SPECIES = ["ant", "bee", "fly", "moth", "wasp"]
NARROW = ["bee", "wasp"]


@pytest.fixture(scope="module")
def species_data(tmp_path_factory):
    """Five classes, 6 train and 3 test images each (40 px): the benchmark's train/ + test/ layout."""
    root = tmp_path_factory.mktemp("species")
    for c, name in enumerate(SPECIES):
        write_images(root / "train" / name, 6, seed=c)
        write_images(root / "test" / name, 3, seed=100 + c)
    return str(root)


def args(data, run_dir, tmp_path):
    return [f"--DATA_DIR={data}", f"--RUN_DIR={run_dir}", f"--TABLE={tmp_path / 'transfer.md'}",
            f"--FIGURE={tmp_path / 'species.png'}", f"--NARROW_SPECIES={NARROW}", "--MODEL_ARCH=mobilenet_v3_small",
            "--IMAGE_SIZE=32", "--EPOCHS_BROAD=1", "--EPOCHS_NARROW=2", "--FREEZE_BACKBONE_EPOCHS=1",
            "--EPOCHS_SCRATCH=1", "--SAMPLES_PER_CLASS=6", "--TARGETS=[0.1, 0.3]", "--FINETUNE_EPOCHS=1",
            "--BN_BATCHES=1", "--ITERATIVE_SAMPLES_PER_CLASS=2", "--TAYLOR_BATCHES=1", "--BATCH_SIZE=8",
            "--NUM_WORKERS=0"]


def ok(*a):
    code, out, err = run_stage(os.path.join(ROOT, "benchmarks", "transfer.py"), *a)
    assert code == 0, f"transfer exited {code}: {err[-3000:]}"
    return out
