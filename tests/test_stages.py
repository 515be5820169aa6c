"""Every stage script, chained on a tiny data set, for Large and Small (32 px, one training epoch)."""

import json
import os

import pytest
import torch

from mbv3prune import models
from tests.helpers import run_stage

ARCHS = ["mobilenet_v3_small", "mobilenet_v3_large"]


def common(run_dir, arch, data):
    return [f"--RUN_DIR={run_dir}", f"--MODEL_ARCH={arch}", f"--DATA_DIR={data}", "--IMAGE_SIZE=32", "--NUM_WORKERS=0"]


def ok(script, *args):
    code, out, err = run_stage(script, *args)
    assert code == 0, f"{script} exited {code}: {err[-2000:]}"
    return out


@pytest.fixture(scope="module", params=ARCHS)
def pipeline(request, tiny_data, tmp_path_factory):
    """A run directory after stages 0-3 (train, structure, capture, plan) for one architecture."""
    arch, run = request.param, str(tmp_path_factory.mktemp(request.param))
    args = common(run, arch, tiny_data)
    ok("train_model.py", *args, "--EPOCHS=1", "--BN_BATCHES=1")
    ok("mobilenetv3_features.py", f"--RUN_DIR={run}", f"--MODEL_ARCH={arch}")
    ok("get_model_architecture.py", f"--RUN_DIR={run}", f"--MODEL_ARCH={arch}", "--IMAGE_SIZE=32")
    ok("visualize_neuron_activations.py", *args)
    out = ok("visualize_channel_activation.py", *args, "--DEADNESS_THRESHOLD=0.5")
    assert "pruning_plan_default.json" in out and "next:" in out
    return arch, run, args


def test_capture_and_plan_artifacts(pipeline):
    arch, run, _ = pipeline
    blocks = json.load(open(os.path.join(run, "mobilenetv3_block_structure.json")))["blocks"]
    stats = torch.load(os.path.join(run, "activation_stats.pt"), weights_only=True)
    meta = json.load(open(os.path.join(run, "activation_stats.json")))
    assert meta["sample"]["images"] == 18 and {y for _, y in meta["sample"]["files"]} == {0, 1, 2}
    for roles in blocks.values():
        layer = roles["project"]
        assert stats[f"{layer}/below"].shape == (roles["hidden_channels"],)
        assert os.path.exists(os.path.join(run, "activations", f"{layer.replace('.', '_')}_hist.png"))
        assert os.path.exists(os.path.join(run, "deadness", f"{layer.replace('.', '_')}_deadness_grid.png"))
    for name in ("threshold_sensitivity.png", "deadness_histogram.png", "activation_summary.json", "architecture.json"):
        assert os.path.exists(os.path.join(run, name)), name
    plan = json.load(open(os.path.join(run, "pruning_plan_default.json")))
    assert plan["model"]["arch"] == arch and set(plan["blocks"]) == set(blocks)


def test_replan_from_saved_statistics_without_capture(pipeline):
    _, run, args = pipeline
    before = os.path.getmtime(os.path.join(run, "activation_stats.pt"))
    out = ok("visualize_channel_activation.py", *args, "--DEADNESS_THRESHOLD=0.2", "--PLAN_TAG=low", "--GRIDS=False")
    assert "re-using" in out and os.path.getmtime(os.path.join(run, "activation_stats.pt")) == before
    assert os.path.exists(os.path.join(run, "pruning_plan_low.json"))


@pytest.mark.parametrize(
    "mode",
    [
        ["--PRUNE_MODE=target_macs", "--TARGET_MACS_REDUCTION=0.3"],
        ["--PRUNE_MODE=target_macs", "--SCORE=contribution", "--TARGET_MACS_REDUCTION=0.15"],
        [
            "--PRUNE_MODE=target_macs",
            "--SCORE=mean_abs",
            "--RECONSTRUCT=none",
            "--COMPENSATE=False",
            "--BN_RECALIBRATE=False",
        ],
        ["--PRUNE_MODE=target_macs", "--SCORE=obs", "--RECONSTRUCT=oneshot"],
        [],
        ["--PRUNE_MODE=target_macs", "--SCORE=fluctuation", "--TARGET_MACS_REDUCTION=0.15"],
        ["--PRUNE_MODE=threshold", "--FALLBACK_TARGET=0.2"],
        ["--PRUNE_MODE=iterative", "--TARGET_MACS_REDUCTION=0.0", "--RECONSTRUCT=none", "--CORRECT_VARIANCE=True"],
        ["--PRUNE_MODE=iterative", "--SCORE=obs", "--TARGET_MACS_REDUCTION=0.0"],
    ],
)
def test_prune_then_validate_and_overlay(pipeline, mode):
    arch, run, args = pipeline
    out = ok("experiment_activation_based_block_pruning.py", *args, *mode, "--LATENCY=False")
    report = json.load(open(os.path.join(run, "pruning_report.json")))
    assert ("bn_recalibrated" in report["accuracy"]) == ("--BN_RECALIBRATE=False" not in mode)
    assert 0 <= report["baseline_bn_recalibrated"]["top1"] <= 1  # the recalibrated unpruned baseline, always
    assert set(report["block_output_error"]) == set(report["blocks"])
    if "--PRUNE_MODE=iterative" in mode:
        assert report["rounds"] and os.path.exists(os.path.join(run, "deadness_rounds.png"))
    else:
        assert report["macs_reduction"] >= 0.10
    assert "hidden channels" in out
    pruned, _ = models.load_checkpoint(os.path.join(run, "pruned.pt"))
    assert models.layer_widths(pruned) == report["pruned_widths"]
    ok("validate_model_structure.py", *args, "--EXPORT=trace")
    assert json.load(open(os.path.join(run, "validation.json")))["passed"]
    ok("visualize_activation_overlay_image.py", *args[:4], "--MAX_IMAGES=1")
    assert os.path.exists(os.path.join(run, "overlays", "panel_img00.png"))


def test_broken_model_fails_validation_naming_the_check(pipeline, tmp_path):
    arch, run, args = pipeline
    model, meta = models.load_checkpoint(os.path.join(run, "baseline.pt"))
    bn = model.get_submodule(
        next(iter(json.load(open(os.path.join(run, "mobilenetv3_block_structure.json")))["blocks"].values()))[
            "project_bn"
        ]
    )
    bn.running_var.fill_(-1.0)  # negative variance: NaN everywhere downstream
    broken = str(tmp_path / "broken.pt")
    models.save_checkpoint(broken, model, arch, meta["class_names"])
    code, out, err = run_stage(
        "validate_model_structure.py",
        *args,
        f"--CHECKPOINT={broken}",
        "--EXPORT=none",
        "--ORIGINAL=none",
        "--REPORT=none",
    )
    assert code == 2 and "finite_on_random_input" in err and "Traceback" not in err


def test_plan_from_another_model_is_refused(pipeline, tmp_path):
    arch, run, args = pipeline
    plan = json.load(open(os.path.join(run, "pruning_plan_default.json")))
    layer = next(iter(plan["model"]["widths"]))
    plan["model"]["widths"][layer]["out"] = plan["model"]["widths"][layer].get("out", 0) + 8
    other = tmp_path / "other_plan.json"
    other.write_text(json.dumps(plan))
    code, _, err = run_stage("experiment_activation_based_block_pruning.py", *args, f"--PLAN={other}")
    assert code == 2 and layer in err and "Traceback" not in err


def test_validation_exports_to_onnx_and_times_both_models(pipeline):
    arch, run, args = pipeline
    ok("experiment_activation_based_block_pruning.py", *args, "--LATENCY=False", "--TARGET_MACS_REDUCTION=0.2")
    ok("validate_model_structure.py", *args, "--EXPORT=onnx")
    result = json.load(open(os.path.join(run, "validation.json")))
    assert result["passed"] and set(result["onnx"]) == {"pruned", "baseline"}
    for name, record in result["onnx"].items():
        assert os.path.exists(os.path.join(run, f"{name}.onnx")) and record["max_abs_diff"] < 1e-2
        assert set(record["latency_ms"]["onnxruntime"]) == {"1", "32"}


def test_target_latency_prunes_by_a_cached_eager_latency_table(pipeline):
    arch, run, args = pipeline
    mode = ["--PRUNE_MODE=target_latency", "--LATENCY_RUNTIME=eager", "--LATENCY_REPEATS=3", "--LATENCY=False"]
    check = ["--LATENCY_CALIBRATE=1", "--LATENCY_CHECK_REPEATS=3"]
    out = ok("experiment_activation_based_block_pruning.py", *args, *mode, *check, "--TARGET_LATENCY_REDUCTION=0.1")
    report = json.load(open(os.path.join(run, "pruning_report.json")))
    # a real (timed) table and whole-model check: how far they get depends on the machine's load (even whether a
    # chunk saves time at 32 px), so only the wiring is asserted here; the selection and reaching the target are
    # tested on injected tables and measurements (test_latency.py, test_latency_feedback.py, test_criterion.py)
    assert report["mode"] == "target_latency" and report["predicted_latency_reduction"] >= 0
    assert report["macs_reduction"] >= 0 and "measured the latency table" in out
    rounds = report["latency_calibration"]
    assert 1 <= len(rounds) <= 2 and report["measured_latency_reduction"] in [r["measured"] for r in rounds]
    assert "table aim" in out
    out = ok("experiment_activation_based_block_pruning.py", *args, *mode, *check, "--TARGET_LATENCY_REDUCTION=0.05")
    assert "re-using the latency table" in out
