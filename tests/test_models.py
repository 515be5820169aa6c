import pytest
import torch
import torchvision

from mbv3prune import models
from mbv3prune.errors import PruneError


def _same_output(a, b, size=32):
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return torch.equal(a.eval()(x), b.eval()(x))


@pytest.mark.parametrize("arch", models.ARCHS)
def test_checkpoint_round_trip_weights_only(tmp_path, arch):
    model = models.build_model(arch, 4)
    path = tmp_path / "c.pt"
    models.save_checkpoint(path, model, arch, ["a", "b", "c", "d"], {"SEED": 0})
    raw = torch.load(path, weights_only=True)
    assert raw["arch"] == arch and raw["class_names"] == ["a", "b", "c", "d"] and "features.4.block.2.fc1" in raw["widths"]
    loaded, meta = models.load_checkpoint(str(path))
    assert meta["arch"] == arch and _same_output(model, loaded)
    assert _same_output(model, models.load_model(str(path)))


def test_resized_widths_round_trip(tmp_path):
    """A model whose SE widths no torchvision config gives still rebuilds from its recorded widths."""
    model = models.build_model("mobilenet_v3_small", 3)
    widths = models.layer_widths(model)
    widths["features.4.block.2.fc1"]["out"] = 13
    widths["features.4.block.2.fc2"]["in"] = 13
    model = models.apply_widths(model, widths)
    models.save_checkpoint(tmp_path / "p.pt", model, "mobilenet_v3_small", list("abc"))
    loaded, _ = models.load_checkpoint(str(tmp_path / "p.pt"))
    assert loaded.get_submodule("features.4.block.2.fc1").out_channels == 13 and _same_output(model, loaded)


@pytest.mark.parametrize("arch, classes", [("mobilenet_v3_large", 7), ("mobilenet_v3_small", 1000)])
def test_plain_state_dict_any_class_count(tmp_path, arch, classes):
    model = getattr(torchvision.models, arch)(num_classes=classes)
    torch.save(model.state_dict(), tmp_path / "sd.pth")
    loaded, meta = models.load_checkpoint(str(tmp_path / "sd.pth"))
    assert meta["arch"] == arch and meta["num_classes"] == classes and _same_output(model, loaded)
    torch.save({"model": {"module." + k: v for k, v in model.state_dict().items()}}, tmp_path / "wrapped.pth")
    assert _same_output(model, models.load_checkpoint(str(tmp_path / "wrapped.pth"))[0])


def test_whole_model_pickle_needs_allow_pickle(tmp_path):
    model = torchvision.models.mobilenet_v3_small(num_classes=3)
    torch.save(model, tmp_path / "whole.pt")  # deliberately a whole-model pickle: the input this test refuses
    with pytest.raises(PruneError, match="whole-model pickle.*ALLOW_PICKLE=True"):
        models.load_checkpoint(str(tmp_path / "whole.pt"))
    with pytest.warns(UserWarning, match="weights_only=False"):
        loaded, _ = models.load_checkpoint(str(tmp_path / "whole.pt"), allow_pickle=True)
    assert _same_output(model, loaded)


def test_bad_checkpoints_name_the_file(tmp_path):
    with pytest.raises(PruneError, match="missing.pt does not exist"):
        models.load_checkpoint(str(tmp_path / "missing.pt"))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(PruneError, match="junk.pt cannot be read"):
        models.load_checkpoint(str(tmp_path / "junk.pt"))
    torch.save({"w": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(PruneError, match="other.pt is not a torchvision MobileNetV3"):
        models.load_checkpoint(str(tmp_path / "other.pt"))
    models.save_checkpoint(tmp_path / "s.pt", models.build_model("mobilenet_v3_small", 2), "mobilenet_v3_small", ["a", "b"])
    with pytest.raises(PruneError, match="is a mobilenet_v3_small, but MODEL_ARCH=mobilenet_v3_large"):
        models.load_checkpoint(str(tmp_path / "s.pt"), arch="mobilenet_v3_large")
    with pytest.raises(PruneError, match="unknown MODEL_ARCH 'resnet50'"):
        models.build_model("resnet50", 2)


def test_imagenet_weights_missing_says_where_to_put_them(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(PruneError, match=r"not in the local torch cache: put mobilenet_v3_small-.*\.pth"):
        models.load_checkpoint("imagenet", arch="mobilenet_v3_small")


def test_imagenet_weights_from_cache(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    path, _ = models.imagenet_weights_path("mobilenet_v3_small")
    (tmp_path / "checkpoints").mkdir()
    model = torchvision.models.mobilenet_v3_small()
    torch.save(model.state_dict(), path)
    loaded, meta = models.load_checkpoint("imagenet", arch="mobilenet_v3_small")
    assert len(meta["class_names"]) == 1000 and _same_output(model, loaded)


def test_pick_device():
    assert models.pick_device("cpu").type == "cpu"
    assert models.pick_device("auto").type in ("cpu", "cuda", "mps")
    with pytest.raises(PruneError, match="unknown DEVICE"):
        models.pick_device("tpu")
