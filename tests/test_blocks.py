import pytest
from torch import nn

from mbv3prune.blocks import find_blocks
from mbv3prune.errors import PruneError
from mbv3prune.models import build_model


def test_large_blocks_by_name():
    blocks = find_blocks(build_model("mobilenet_v3_large", 10))
    assert list(blocks) == [f"features.{i}" for i in range(1, 16)]
    first = blocks["features.1"]
    assert "expand" not in first and "se" not in first and first["has_residual"]
    assert first["depthwise"] == "features.1.block.0.0" and first["project"] == "features.1.block.1.0"
    b4 = blocks["features.4"]
    assert b4["expand"] == "features.4.block.0.0" and b4["se_fc1"] == "features.4.block.2.fc1"
    assert b4["se_fc2"] == "features.4.block.2.fc2" and b4["project"] == "features.4.block.3.0"
    assert b4["project_bn"] == "features.4.block.3.1" and b4["hidden_channels"] == 72
    b7 = blocks["features.7"]
    assert "se" not in b7 and b7["activation"] == "Hardswish" and b7["project"] == "features.7.block.2.0"
    assert blocks["features.15"]["has_residual"] and not blocks["features.4"]["has_residual"]


def test_small_blocks_by_name():
    blocks = find_blocks(build_model("mobilenet_v3_small", 10))
    assert list(blocks) == [f"features.{i}" for i in range(1, 12)]
    first = blocks["features.1"]
    assert "expand" not in first and first["se_fc1"] == "features.1.block.1.fc1"
    assert first["project"] == "features.1.block.2.0" and not first["has_residual"]
    assert blocks["features.2"]["expand"] == "features.2.block.0.0" and "se" not in blocks["features.2"]


@pytest.mark.parametrize("arch", ["mobilenet_v3_large", "mobilenet_v3_small"])
def test_every_depthwise_conv_is_depthwise(arch):
    model = build_model(arch, 5)
    for roles in find_blocks(model).values():
        dw = model.get_submodule(roles["depthwise"])
        assert dw.in_channels == dw.out_channels == dw.groups == roles["hidden_channels"]
        assert model.get_submodule(roles["project"]).in_channels == roles["hidden_channels"]
        if "se" in roles:
            assert model.get_submodule(roles["se_fc1"]).in_channels == roles["hidden_channels"]


def test_width_mult_and_resized_models():
    import torchvision

    model = torchvision.models.mobilenet_v3_large(width_mult=0.5, num_classes=3)
    blocks = find_blocks(model)
    assert blocks["features.4"]["hidden_channels"] == model.get_submodule("features.4.block.1.0").out_channels


def test_not_a_mobilenet():
    with pytest.raises(PruneError, match="no MobileNetV3 inverted-residual blocks"):
        find_blocks(nn.Sequential(nn.Conv2d(3, 8, 3)))
