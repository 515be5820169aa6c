import argparse
import copy

import pytest
import torch
import torchvision
from torch import nn

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
    assert (
        raw["arch"] == arch and raw["class_names"] == ["a", "b", "c", "d"] and "features.4.block.2.fc1" in raw["widths"]
    )
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
    models.save_checkpoint(
        tmp_path / "s.pt", models.build_model("mobilenet_v3_small", 2), "mobilenet_v3_small", ["a", "b"]
    )
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


def _prefixed(state_dict, prefix):
    return {prefix + k: v for k, v in state_dict.items()}


def _optimizer_state(model):
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(1, 3, 32, 32)).sum().backward()
    opt.step()
    return opt.state_dict()


def torchvision_reference(model):
    """What torchvision's references/classification/train.py saves (model_without_ddp, EMA, argparse args)."""
    ema = torch.optim.swa_utils.AveragedModel(model)
    return {
        "model": model.state_dict(),
        "optimizer": _optimizer_state(model),
        "lr_scheduler": {"last_epoch": 3},
        "epoch": 3,
        "args": argparse.Namespace(model="mobilenet_v3_small", lr=0.064),
        "model_ema": ema.state_dict(),
    }


def lightning(model, attribute="model."):
    """PyTorch Lightning's checkpoint layout: the LightningModule's state_dict, keys under its attribute."""
    criterion = nn.CrossEntropyLoss(weight=torch.ones(3))
    state = {**_prefixed(model.state_dict(), attribute), "criterion.weight": criterion.weight}
    return {
        "epoch": 2,
        "global_step": 40,
        "pytorch-lightning_version": "2.4.0",
        "state_dict": state,
        "loops": {"fit_loop": {"epoch_progress": {"total": {"completed": 2}}}},
        "callbacks": {},
        "optimizer_states": [_optimizer_state(model)],
        "lr_schedulers": [],
        "hparams_name": "kwargs",
        "hyper_parameters": {"lr": 0.01},
    }


FORMATS = [  # (name, make the saved object from a model, needs ALLOW_PICKLE)
    ("bare state_dict", lambda m: m.state_dict(), False),
    ("torchvision reference script", torchvision_reference, True),
    ("Lightning", lightning, False),
    ("Lightning around torch.compile", lambda m: lightning(torch.compile(m)), False),
    ("DDP (module.)", lambda m: _prefixed(m.state_dict(), "module."), False),
    ("torch.compile (_orig_mod.)", lambda m: torch.compile(m).state_dict(), False),
    ("DDP around torch.compile", lambda m: _prefixed(torch.compile(m).state_dict(), "module."), False),
    (
        "model_state_dict with optimizer",
        lambda m: {"model_state_dict": m.state_dict(), "epoch": 1, "optimizer_state_dict": _optimizer_state(m)},
        False,
    ),
    ("net", lambda m: {"net": m.state_dict(), "acc": 0.9}, False),
]


@pytest.mark.parametrize("name, make, needs_pickle", FORMATS, ids=[f[0] for f in FORMATS])
def test_checkpoint_formats_of_common_training_code(tmp_path, name, make, needs_pickle):
    model = torchvision.models.mobilenet_v3_small(num_classes=3).eval()
    torch.save(make(model), tmp_path / "ckpt.pth")  # the optimizer's step in ``make`` changes the weights saved
    reference = copy.deepcopy(model)
    if needs_pickle:
        with pytest.raises(
            PruneError,
            match=r"ckpt.pth holds a pickled Python object \(argparse.Namespace\).*"
            "set ALLOW_PICKLE=True",
        ):
            models.load_checkpoint(str(tmp_path / "ckpt.pth"))
        with pytest.warns(UserWarning, match="weights_only=False"):
            loaded, meta = models.load_checkpoint(str(tmp_path / "ckpt.pth"), allow_pickle=True)
    else:
        loaded, meta = models.load_checkpoint(str(tmp_path / "ckpt.pth"))
    assert meta["arch"] == "mobilenet_v3_small" and meta["num_classes"] == 3
    assert _same_output(reference, loaded)


def _linear_head(model, k):
    model.classifier = nn.Linear(model.classifier[0].in_features, k)
    return model


def _wide_head(model, k):
    model.classifier[0] = nn.Linear(model.classifier[0].in_features, 300)
    model.classifier[3] = nn.Linear(300, k)
    return model


@pytest.mark.parametrize("arch", models.ARCHS)
@pytest.mark.parametrize("make_head", [_linear_head, _wide_head], ids=["one Linear", "hidden width 300"])
def test_replaced_heads_load_and_round_trip(tmp_path, arch, make_head):
    model = make_head(getattr(torchvision.models, arch)(num_classes=1000), 5).eval()
    torch.save({"model": model.state_dict()}, tmp_path / "head.pth")
    loaded, meta = models.load_checkpoint(str(tmp_path / "head.pth"))
    assert meta["num_classes"] == 5 and models.head(loaded).out_features == 5 and _same_output(model, loaded)
    models.save_checkpoint(tmp_path / "ours.pt", loaded, arch, list("abcde"))
    again, _ = models.load_checkpoint(str(tmp_path / "ours.pt"))
    assert _same_output(model, again)


def test_other_heads_are_refused_naming_the_key(tmp_path):
    model = torchvision.models.mobilenet_v3_small(num_classes=3)
    model.classifier = nn.Sequential(nn.Linear(576, 64), nn.ReLU(), nn.Linear(64, 3))
    torch.save(model.state_dict(), tmp_path / "mlp.pth")
    with pytest.raises(
        PruneError,
        match=r"mlp.pth has a classifier this project cannot rebuild "
        r"\(key classifier.2.bias\)",
    ):
        models.load_checkpoint(str(tmp_path / "mlp.pth"))


def test_two_models_in_one_file_are_refused_naming_their_prefixes(tmp_path):
    a, b = (torchvision.models.mobilenet_v3_small(num_classes=3) for _ in range(2))
    torch.save(
        {"state_dict": {**_prefixed(a.state_dict(), "student."), **_prefixed(b.state_dict(), "teacher.")}},
        tmp_path / "kd.ckpt",
    )
    with pytest.raises(PruneError, match="several MobileNetV3 state_dicts.*student., teacher."):
        models.load_checkpoint(str(tmp_path / "kd.ckpt"))
