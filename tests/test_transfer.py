"""benchmarks/transfer.py end to end on tiny generated species: views without copies, three models, resumable."""

import csv
import json
import os

import pytest

from tests.helpers import ROOT, run_stage, write_images

SPECIES = ["ant", "bee", "fly", "moth", "wasp"]
CRITERIA = ["deadness", "deadness_iterative", "mean_abs", "obs", "tp_taylor"]
COMPARED = CRITERIA + ["obs+sequential", "tp_taylor+sequential"]  # compare_criteria's RECONSTRUCT_CRITERIA refit
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
    return [
        f"--DATA_DIR={data}",
        f"--RUN_DIR={run_dir}",
        f"--TABLE={tmp_path / 'transfer.md'}",
        f"--FIGURE={tmp_path / 'species.png'}",
        f"--NARROW_SPECIES={NARROW}",
        "--MODEL_ARCH=mobilenet_v3_small",
        "--IMAGE_SIZE=32",
        "--EPOCHS_BROAD=1",
        "--EPOCHS_NARROW=2",
        "--FREEZE_BACKBONE_EPOCHS=1",
        "--EPOCHS_SCRATCH=1",
        "--SAMPLES_PER_CLASS=6",
        "--TARGETS=[0.1, 0.3]",
        f"--CRITERIA={CRITERIA}",
        "--FINETUNE_EPOCHS=1",
        "--BN_BATCHES=1",
        "--ITERATIVE_SAMPLES_PER_CLASS=2",
        "--TAYLOR_BATCHES=1",
        "--BATCH_SIZE=8",
        "--NUM_WORKERS=0",
    ]


def ok(*a):
    code, out, err = run_stage(os.path.join(ROOT, "benchmarks", "transfer.py"), *a)
    assert code == 0, f"transfer exited {code}: {err[-3000:]}"
    return out


def test_transfer_end_to_end_reports_dead_channels_criteria_and_species_and_resumes(species_data, tmp_path):
    run_dir = tmp_path / "run"
    ok(*args(species_data, run_dir, tmp_path))
    record = json.load(open(run_dir / "transfer.json"))
    assert record["split"] == {"broad": ["ant", "fly", "moth"], "narrow": NARROW}
    # the views list the original files, the split's species only, and copy nothing into RUN_DIR
    for view, names in (("broad", record["split"]["broad"]), ("narrow", NARROW)):
        rows = list(csv.DictReader(open(run_dir / "data" / f"{view}.csv")))
        assert {r["label"] for r in rows} == set(names) and {r["split"] for r in rows} == {"train", "val", "test"}
        assert all(os.path.isfile(os.path.join(run_dir, "data", r["path"])) for r in rows)
        assert all(os.path.realpath(os.path.join(run_dir, "data", r["path"])).startswith(species_data) for r in rows)
    assert not [f for _, _, files in os.walk(run_dir) for f in files if f.endswith(".png") and "criteria" not in f]
    # the fine-tuned model starts from the broad one with the recipe; the scratch one from random init
    from mbv3prune import models
    from mbv3prune.artifacts import sha256_file

    _, meta = models.load_checkpoint(str(run_dir / "narrow_transfer" / "baseline.pt"))
    assert meta["extra"]["init_checkpoint"]["sha256"] == sha256_file(run_dir / "broad" / "baseline.pt")
    assert meta["config"]["FREEZE_BACKBONE_EPOCHS"] == 1 and meta["class_names"] == NARROW
    _, scratch = models.load_checkpoint(str(run_dir / "narrow_scratch" / "baseline.pt"))
    assert scratch["extra"]["init_checkpoint"] is None
    for name in ("narrow_transfer", "narrow_scratch"):
        dead = record["results"][f"{name}/dead_removed"]
        assert 0 <= dead["removed_channels"] <= dead["dead_channels"] <= dead["prunable_channels"]
        assert sum(dead["dead_per_block"].values()) == dead["dead_channels"]
        assert (dead["macs_reduction"] > 0) == (dead["removed_channels"] > 0)
        assert len(record["baselines"][name]["correct"]) == 6  # the narrow species' test photos
        for contest in record["contests"][name].values():  # 10% and 30%: no FT, BN; 30%: fine-tuned too
            assert set(contest["against"]) | {contest["best"]} == set(COMPARED)
            for p in contest["against"].values():
                assert p["ci95"][0] <= p["diff"] <= p["ci95"][1] and p["diff"] >= 0
                assert p["verdict"] == ("better" if p["ci95"][0] > 0 else "tie")
        assert sorted(record["contests"][name]) == [
            "0.1/bn_recalibrated",
            "0.1/pruned",
            "0.3/bn_recalibrated",
            "0.3/finetuned",
            "0.3/pruned",
        ]
    served = record["served"]
    dead = record["results"]["narrow_transfer/dead_removed"]
    assert served["dead"]["channels"] == dead["dead_channels"]
    assert served["dead"]["channels"] + served["alive"]["channels"] == dead["prunable_channels"]
    for kind in ("dead", "alive"):
        assert sum(served[kind]["top_species"].values()) == served[kind]["channels"]
    assert served["alive"]["top_species"]["none"] == 0  # alive for the narrow species: active for one of them
    table = open(tmp_path / "transfer.md").read()
    assert "Narrow species (2): bee, wasp" in table and "| narrow_scratch |" in table and "tp_taylor" in table
    assert os.path.getsize(tmp_path / "species.png") > 0
    again = ok(*args(species_data, run_dir, tmp_path))
    assert again.count("reusing") == 3 and again.count("results already measured") == 2
    assert json.load(open(run_dir / "transfer.json"))["contests"] == record["contests"]


def test_narrow_species_must_exist_and_leave_a_broad_task(species_data, tmp_path):
    code, _, err = run_stage(
        os.path.join(ROOT, "benchmarks", "transfer.py"),
        f"--DATA_DIR={species_data}",
        f"--RUN_DIR={tmp_path}",
        '--NARROW_SPECIES=["bee", "tulip"]',
    )
    assert code == 2 and "'tulip'" in err and "ant, bee, fly, moth, wasp" in err
    code, _, err = run_stage(
        os.path.join(ROOT, "benchmarks", "transfer.py"),
        f"--DATA_DIR={species_data}",
        f"--RUN_DIR={tmp_path}",
        '--NARROW_SPECIES=["ant", "bee", "fly", "moth"]',
    )
    assert code == 2 and "at least 2 species on each side" in err
