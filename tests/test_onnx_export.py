"""Tests of mbv3prune.onnx_export on a tiny MobileNetV3-Small: export with a dynamic batch, agreement with eager,
a pruned model, refusals naming the file, and timing in both runtimes (positive medians, no speed asserted)."""
import os

import onnx
import pytest
import torch

from mbv3prune import onnx_export
from mbv3prune.blocks import find_blocks
from mbv3prune.errors import PruneError
from mbv3prune.prune import prune_blocks
from tests.conftest import randomized_model

SIZE = 32
SHAPE = (3, SIZE, SIZE)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(model, path) of a randomized Small exported once for the whole module."""
    model = randomized_model("mobilenet_v3_small", seed=0, size=SIZE)
    path = str(tmp_path_factory.mktemp("onnx") / "baseline.onnx")
    onnx_export.export_onnx(model, path, SHAPE)
    return model, path


def test_export_has_a_dynamic_batch_axis_and_leaves_no_temporary_file(exported):
    model, path = exported
    graph = onnx.load(path).graph
    dim0 = graph.input[0].type.tensor_type.shape.dim[0]
    assert graph.input[0].name == onnx_export.INPUT and dim0.dim_param and not dim0.dim_value
    assert os.listdir(os.path.dirname(path)) == ["baseline.onnx"]
    assert model.training is False and next(model.parameters()).device.type == "cpu"


def test_onnxruntime_matches_eager_at_batch_1_and_3(exported):
    model, path = exported
    diff = onnx_export.max_difference(model, path, SHAPE, batch_sizes=(1, 3))
    assert 0 <= diff < 1e-4
    logits = model(onnx_export.example_batch(SHAPE, 3))
    assert logits.abs().max() > 1e-2  # the comparison is not between near-zero outputs


def test_another_models_file_is_refused_with_its_name(exported):
    _, path = exported
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


def test_pruned_model_exports_and_matches(tmp_path):
    model = randomized_model("mobilenet_v3_small", seed=2, size=SIZE)
    blocks = find_blocks(model)
    name = [b for b, roles in blocks.items() if "expand" in roles][-1]
    prune_blocks(model, blocks, {name: list(range(0, blocks[name]["hidden_channels"], 3))}, SIZE)
    record = onnx_export.export_checked(model, tmp_path / "pruned.onnx", SIZE, batch_sizes=(1, 2), repeats=3,
                                        warmup=1)
    assert record["max_abs_diff"] < 1e-4
    kept, roles = blocks[name]["hidden_channels"] * 2 // 3, blocks[name]
    dims = [tuple(i.dims) for i in onnx.load(record["path"]).graph.initializer]
    shapes = [tuple(p.shape) for p in model.state_dict().values()]
    for shape in [(kept, roles["in_channels"], 1, 1), (roles["hidden_channels"], roles["in_channels"], 1, 1)]:
        assert dims.count(shape) == shapes.count(shape)  # the expand conv at its pruned width, not the original
    assert (kept, roles["in_channels"], 1, 1) in dims


def test_runtime_latency_gives_positive_medians_with_torchs_threads(exported):
    model, path = exported
    out = onnx_export.runtime_latency(model, path, SHAPE, batch_sizes=(1, 2), repeats=3, warmup=1)
    assert out["threads"] == torch.get_num_threads()
    for runtime in ("eager", "onnxruntime"):
        assert set(out[runtime]) == {1, 2} and all(ms > 0 for ms in out[runtime].values())
    assert onnx_export.session(path).get_session_options().intra_op_num_threads == torch.get_num_threads()
