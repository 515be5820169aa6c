"""The accuracy benchmarks end to end on a tiny run: matched MACs, every step scored, resumable, tables written."""

import json
import os

import pytest
import torch

from mbv3prune.blocks import find_blocks
from tests.helpers import ROOT, run_stage

ARCH = "mobilenet_v3_small"


def ok(script, *args):
    code, out, err = run_stage(script, *args)
    assert code == 0, f"{script} exited {code}: {err[-2000:]}"
    return out


@pytest.fixture(scope="module")
def run(tiny_data, tmp_path_factory):
    """A run directory with a baseline and its activation statistics (32 px, one epoch)."""
    run_dir = str(tmp_path_factory.mktemp("bench_run"))
    args = [
        f"--RUN_DIR={run_dir}",
        f"--MODEL_ARCH={ARCH}",
        f"--DATA_DIR={tiny_data}",
        "--IMAGE_SIZE=32",
        "--NUM_WORKERS=0",
    ]
    ok("train_model.py", *args, "--EPOCHS=1", "--BN_BATCHES=1")
    ok("visualize_neuron_activations.py", *args)
    return run_dir, args


def test_compare_criteria_matches_macs_scores_every_step_and_resumes(run, tmp_path):
    run_dir, args = run
    script = os.path.join(ROOT, "benchmarks", "compare_criteria.py")
    bench_args = [
        *args,
        "--TARGETS=[0.3]",
        '--FT_POINTS=[["global", 0.3]]',
        "--FINETUNE_EPOCHS=1",
        '--CRITERIA=["deadness", "deadness_iterative", "fluctuation", "tp_l1", "tp_taylor", '
        '"tp_bn_scale", "tp_activation", "random"]',
        "--RANDOM_SEEDS=[0, 1]",
        "--ITERATIVE_SAMPLES_PER_CLASS=2",
        "--TAYLOR_BATCHES=1",
        "--ACTIVATION_IMAGES=8",
        f"--FIGURE={tmp_path / 'fig.png'}",
        f"--TABLE={tmp_path / 'table.md'}",
        "--BN_BATCHES=1",
    ]
    ok(script, *bench_args)
    saved = json.load(open(os.path.join(run_dir, "criteria_comparison.json")))
    results = saved["results"]
    names = [
        "deadness",
        "deadness_iterative",
        "fluctuation",
        "tp_l1",
        "tp_taylor",
        "tp_bn_scale",
        "tp_activation",
        "random_s0",
        "random_s1",
    ]
    uniform = {results[f"uniform/0.3/{n}"]["macs_reduction"] for n in names}
    assert len(uniform) == 1  # the same per-block counts for every criterion
    for n in names:
        r = results[f"global/0.3/{n}"]
        assert r["macs_reduction"] <= 0.3 + 0.01 + 1e-9
        assert 0 <= r["bn_recalibrated"]["ci95"][0] <= r["bn_recalibrated"]["top1"] <= r["bn_recalibrated"]["ci95"][1]
        assert ("finetuned" in r) == (n != "random_s1")  # random: its first seed only
        assert "finetuned" not in results[f"uniform/0.3/{n}"]
    assert {k.split("/")[-1] for k in results if k.startswith("reproduce/")} >= {"deadness_0.05", "tp_l1"}
    table = open(tmp_path / "table.md").read()
    assert all(n in table for n in names) and os.path.getsize(tmp_path / "fig.png") > 0
    again = ok(script, *bench_args)
    assert f"{len(results)} results already measured" in again


def test_prune_modes_compares_threshold_and_iterative_with_and_without_compensation(run, tmp_path):
    run_dir, args = run
    ok(
        os.path.join(ROOT, "benchmarks", "prune_modes.py"),
        *args,
        '--SETTINGS={"deadness": {"threshold": 0.0078125, "deadness_threshold": 0.3}, "mean_abs": {"threshold": 0.5}}',
        '--COMPENSATION=["none", "mean"]',
        '--FINETUNE_COMPENSATION=["mean"]',
        "--FINETUNE_EPOCHS=1",
        "--BN_BATCHES=1",
        f"--TABLE={tmp_path / 'modes.md'}",
    )
    results = json.load(open(os.path.join(run_dir, "prune_modes.json")))["results"]
    for score in ("deadness", "mean_abs"):
        for mode in ("threshold", "iterative"):
            for variant in ("none", "mean"):
                r = results[f"{score}/{mode}/{variant}"]
                assert {"pruned", "bn_recalibrated"} <= set(r) and ("finetuned" in r) == (variant == "mean")
                assert r["removed_channels"] >= 0 and (mode == "threshold") == ("rounds" not in r)
        # iterative prunes only channels that were candidates in the first measurement too: never more
        assert (
            results[f"{score}/iterative/none"]["removed_channels"]
            <= results[f"{score}/threshold/none"]["removed_channels"]
        )
    assert "| mean_abs (< 0.5) | iterative | mean |" in open(tmp_path / "modes.md").read()


def test_statistics_of_another_checkpoint_are_refused_naming_the_file(run, tmp_path):
    from mbv3prune import measure, models
    from mbv3prune.errors import PruneError
    from tests.helpers import randomized_model

    run_dir, _ = run
    other = str(tmp_path / "other.pt")
    models.save_checkpoint(other, randomized_model(ARCH), ARCH, ["ant", "bee", "moth"])
    stats_path = os.path.join(run_dir, "activation_stats.pt")
    stats, meta = measure.load_checked(stats_path, os.path.join(run_dir, "baseline.pt"))
    assert meta["sample"]["images"] == len(measure.sample_items(meta, meta["sample"]["data_dir"])) == 18
    assert all(os.path.exists(p) for p, _ in measure.sample_items(meta, meta["sample"]["data_dir"]))
    with pytest.raises(PruneError, match=f"{stats_path} were measured on another checkpoint than {other}"):
        measure.load_checked(stats_path, other)


@pytest.mark.parametrize("on", [True, False])
def test_compare_criteria_passes_output_units_and_residual_target_on(monkeypatch, on):
    """The comparison's OUTPUT_UNITS reaches the weighted scores' Criterion, RESIDUAL_TARGET the sequential
    refit, and both are part of the results' identity."""
    from types import SimpleNamespace

    from benchmarks import compare_criteria as cc
    from mbv3prune import config

    cfg = {**config.apply_overrides(vars(cc), []), "CRITERIA": ["fluctuation"], "OUTPUT_UNITS": on}
    cfg["RESIDUAL_TARGET"] = not on  # opposite values: a swap of the two would show
    seen = {}

    class Recorded:
        def __init__(self, score, threshold, **kw):
            seen["criterion"] = (score, kw.get("output_units"))

        def rank(self, *args):
            return {}

    monkeypatch.setattr(cc.bench, "Criterion", Recorded)
    monkeypatch.setattr(cc.reconstruct, "folder", lambda *args: seen.setdefault("folder", args))
    stats = {"threshold": torch.tensor(0.5, dtype=torch.float64)}
    cc.rankings(SimpleNamespace(stats=stats, blocks={}, layers={}, model=None), cfg)
    cc.compensator(SimpleNamespace(model=None, refit_batches=None, ridge=0.01), cfg, "sequential")
    assert seen["criterion"] == ("fluctuation", on)
    assert seen["folder"] == ("sequential", None, None, 0.01, not on)
    assert {"OUTPUT_UNITS", "RESIDUAL_TARGET"} <= set(cc.RESULT_KEYS)


def test_perf_summary_reads_the_capture_variants_the_overhead_benchmark_measures(capsys):
    from benchmarks import capture_overhead, perf

    ratios = {name: {"wall_ratio": 1.5, "cpu_ratio": 1.5} for name in capture_overhead.variants(None, None)}
    rss = [{"images": 200, "peak_rss_mb": 900.0}, {"images": 2000, "peak_rss_mb": 900.0}]
    capture = {
        "overhead": {"64px": ratios},
        "overhead_device": "cpu",
        "overhead_threads": 2,
        "peak_rss": rss,
        "rss_ratio": 1.0,
    }
    perf.summary({"capture": capture})
    out = capsys.readouterr().out
    assert "capture/plain, no histograms" in out and "+ second moments" in out and "(2 threads)" in out


def test_capture_overhead_times_every_variant_on_the_given_device(monkeypatch):
    from benchmarks import capture_overhead as co

    settings = {"ARCH": "mobilenet_v3_small", "BATCH": 4, "N_BATCHES": 2, "ROUNDS": 1, "ABLATIONS": True}
    for name, value in settings.items():
        monkeypatch.setattr(co, name, value)
    stage_gram, project = co.M._stage_gram_, co.M.CaptureMoments.project
    times = co.report_size(32, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert set(times) == set(co.variants(None, None)) and co.MOMENTS_VARIANT in times
    assert "... without the project covariance" in times and "... without the covariance Grams" in times
    assert all(wall > 0 and cpu >= 0 for wall, cpu in times.values())
    assert co.M._stage_gram_ is stage_gram and co.M.CaptureMoments.project is project  # put back
    batches = co.make_batches(32, 1, torch.Generator().manual_seed(1))
    model = co.calibrated_model(batches)
    blocks = find_blocks(model)
    variants = co.variants(model, blocks)
    block = next(b for b, roles in blocks.items() if "expand" in roles)
    no_grams, _ = variants["... without the covariance Grams"](batches)
    no_covariance, _ = variants["... without the project covariance"](batches)
    full, _ = variants[co.MOMENTS_VARIANT](batches)
    assert int(no_grams[f"{block}/cov_n"]) > 0 and not no_grams[f"{block}/cov_m2"].any()
    assert int(no_covariance[f"{block}/cov_n"]) == 0 and full[f"{block}/cov_m2"].any()
