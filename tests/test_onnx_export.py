"""Tests of mbv3prune.onnx_export on a tiny MobileNetV3-Small: export with a dynamic batch, agreement with eager,
refusals naming the file, timing in both runtimes (positive medians, no speed asserted), and perf.py's runtimes
part on a tiny run with a pruned model."""

import os

import onnx
import pytest
import torch

from mbv3prune import models, onnx_export
from mbv3prune.blocks import find_blocks
from mbv3prune.errors import PruneError
from mbv3prune.prune import prune_blocks
from tests.helpers import randomized_model

SIZE = 32
SHAPE = (3, SIZE, SIZE)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(model, path, export_checked's record) of a randomized Small exported once for the whole module."""
    model = randomized_model("mobilenet_v3_small", seed=0, size=SIZE)
    path = str(tmp_path_factory.mktemp("onnx") / "baseline.onnx")
    record = onnx_export.export_checked(model, path, SIZE, batch_sizes=(1, 2), repeats=3, warmup=1)
    return model, path, record


def test_export_has_a_dynamic_batch_axis_and_leaves_no_temporary_file(exported):
    model, path, record = exported
    assert record["path"] == path and record["max_abs_diff"] < 1e-4
    graph = onnx.load(path).graph
    dim0 = graph.input[0].type.tensor_type.shape.dim[0]
    assert graph.input[0].name == onnx_export.INPUT and dim0.dim_param and not dim0.dim_value
    assert os.listdir(os.path.dirname(path)) == ["baseline.onnx"]
    assert model.training is False and next(model.parameters()).device.type == "cpu"


def test_onnxruntime_matches_eager_at_batch_1_and_3(exported):
    model, path, _ = exported
    diff = onnx_export.max_difference(model, path, SHAPE, batch_sizes=(1, 3))
    assert 0 <= diff < 1e-4
    logits = model(onnx_export.example_batch(SHAPE, 3))
    assert logits.abs().max() > 1e-2  # the comparison is not between near-zero outputs


def test_another_models_file_is_refused_with_its_name(exported):
    path = exported[1]
    other = randomized_model("mobilenet_v3_small", seed=1, size=SIZE)
    with pytest.raises(PruneError, match="baseline.onnx.*differs from eager"):
        onnx_export.max_difference(other, path, SHAPE)


def test_unreadable_file_is_refused_with_its_name(tmp_path):
    bad = tmp_path / "garbage.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(PruneError, match="garbage.onnx"):
        onnx_export.session(bad)


def test_cuda_without_its_provider_is_refused(exported):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has a CUDA provider")
    with pytest.raises(PruneError, match="onnxruntime-gpu"):
        onnx_export.session(exported[1], device="cuda")


def test_runtime_latency_gives_positive_medians_with_torchs_threads(exported):
    model, path, record = exported
    assert set(record["latency_ms"]["onnxruntime"]) == {1, 2}
    out = onnx_export.runtime_latency(model, path, SHAPE, batch_sizes=(1, 2), repeats=3, warmup=1)
    assert out["threads"] == torch.get_num_threads()
    for runtime in ("eager", "onnxruntime"):
        assert set(out[runtime]) == {1, 2} and all(ms > 0 for ms in out[runtime].values())
    options = onnx_export.session(path, spin=False).get_session_options()
    assert options.intra_op_num_threads == torch.get_num_threads()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_perf_runtimes_part_on_a_tiny_run(tmp_path):
    from benchmarks import perf

    model = randomized_model("mobilenet_v3_small", seed=2, size=SIZE)
    models.save_checkpoint(tmp_path / "baseline.pt", model, "mobilenet_v3_small", ["a", "b", "c"])
    blocks = find_blocks(model)
    name = [b for b, roles in blocks.items() if "expand" in roles][-1]
    prune_blocks(model, blocks, {name: list(range(0, blocks[name]["hidden_channels"], 3))}, SIZE)
    models.save_checkpoint(
        tmp_path / "macs.pt", model, "mobilenet_v3_small", ["a", "b", "c"], config={"PRUNE_MODE": "target_macs"}
    )
    cfg = {
        "RUNTIME_RUNS": [[str(tmp_path), SIZE, "macs.pt"], [str(tmp_path / "absent"), SIZE, "pruned.pt"]],
        "RUNTIME_BATCHES": [1, 2],
        "RUNTIME_REPEATS": 3,
        "RUNTIME_WARMUP": 1,
        "RUNTIME_THREADS": 1,
    }
    threads = torch.get_num_threads()
    [row] = perf.runtimes_part(cfg, torch.device("cpu"))
    assert torch.get_num_threads() == threads and row["threads"] == 1 and row["prune_mode"] == "target_macs"
    assert 0 < row["macs_saved"] < 1 and max(row["max_abs_diff"].values()) < 1e-4
    for rt in ("eager", "onnxruntime"):
        for b in (1, 2):
            base, pruned = row["ms"]["baseline"][rt][b], row["ms"]["pruned"][rt][b]
            assert base > 0 and pruned > 0
            assert row["latency_saved"][rt][b] == round(1 - pruned / base, 4)
            macs_saved = 1 - row["macs"]["pruned"] / row["macs"]["baseline"]
            assert row["latency_per_macs_saved"][rt][b] == pytest.approx(
                row["latency_saved"][rt][b] / macs_saved, abs=1e-3
            )
    assert "saved/MACs" in perf.runtimes_table([row]) and "onnxruntime" in perf.runtimes_table([row])
