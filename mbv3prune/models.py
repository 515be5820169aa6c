"""Building, saving and loading MobileNetV3, pruned or not, and choosing the device.

A checkpoint is a dict around a state_dict with the width of every conv, BN and linear layer recorded
explicitly (torchvision's config would recompute SE widths wrongly after pruning), the class names, the
config that produced it and package versions; it loads with ``torch.load(..., weights_only=True)``.
``load_model(path)`` gives a ready model in a notebook.
"""

import os
import pickle
import re
import warnings

import torch
import torchvision
from torch import nn

from .artifacts import save_torch, versions
from .errors import PruneError

ARCHS = ("mobilenet_v3_large", "mobilenet_v3_small")
FORMAT = "mbv3prune-checkpoint"
_LAST_FEATURE = {"mobilenet_v3_large": "features.16.0.weight", "mobilenet_v3_small": "features.12.0.weight"}
_WEIGHTS = {
    "mobilenet_v3_large": "MobileNet_V3_Large_Weights.IMAGENET1K_V1",
    "mobilenet_v3_small": "MobileNet_V3_Small_Weights.IMAGENET1K_V1",
}


def check_arch(arch):
    if arch not in ARCHS:
        raise PruneError(f"unknown MODEL_ARCH {arch!r}: use one of {', '.join(ARCHS)}")
    return arch


def pick_device(name="auto"):
    """``auto``: CUDA, then Apple MPS, then CPU; otherwise the named device."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise PruneError(f"unknown DEVICE {name!r}: use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PruneError(f"DEVICE={name} but CUDA is not available here: use DEVICE=auto or cpu")
    return device


def to_device(model, device):
    """``model`` moved to ``device``; on CUDA also in channels_last memory format (cuDNN's fastest layout)."""
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if device.type == "cuda" else model


def normalization(arch="mobilenet_v3_large"):
    """ImageNet mean and std, read from torchvision's weights metadata."""
    t = torchvision.models.get_weight(_WEIGHTS[check_arch(arch)]).transforms()
    return list(t.mean), list(t.std)


def layer_widths(model):
    """{module name: widths} for every Conv2d, BatchNorm2d and Linear: enough to rebuild a pruned model."""
    widths = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            widths[name] = {"in": m.in_channels, "out": m.out_channels, "groups": m.groups}
        elif isinstance(m, nn.BatchNorm2d):
            widths[name] = {"features": m.num_features}
        elif isinstance(m, nn.Linear):
            widths[name] = {"in": m.in_features, "out": m.out_features}
    return widths


def _resized(m, w):
    """A fresh copy of layer ``m`` with the widths ``w`` (same kernel, stride, padding, bias, eps...)."""
    if isinstance(m, nn.Conv2d):
        return nn.Conv2d(
            w["in"],
            w["out"],
            m.kernel_size,
            m.stride,
            m.padding,
            m.dilation,
            w["groups"],
            m.bias is not None,
            m.padding_mode,
        )
    if isinstance(m, nn.BatchNorm2d):
        return nn.BatchNorm2d(w["features"], m.eps, m.momentum, m.affine, m.track_running_stats)
    return nn.Linear(w["in"], w["out"], m.bias is not None)


def apply_widths(model, widths):
    """Replace every layer whose recorded widths differ from the model's with a resized one."""
    current = layer_widths(model)
    unknown = sorted(set(widths) - set(current))
    if unknown:
        raise PruneError(f"recorded widths name layers this model does not have: {', '.join(unknown[:5])}")
    for name, w in widths.items():
        if w != current[name]:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            setattr(parent, child, _resized(getattr(parent, child), w))
    return model


def head(model):
    """The model's last Linear (``classifier`` itself for a one-Linear head, else ``classifier[-1]``)."""
    return model.classifier if isinstance(model.classifier, nn.Linear) else model.classifier[-1]


def set_head(model, layer):
    """Put ``layer`` in place of the model's last Linear; returns the model."""
    if isinstance(model.classifier, nn.Linear):
        model.classifier = layer
    else:
        model.classifier[-1] = layer
    return model


def build_model(arch, num_classes, widths=None):
    """A randomly initialised torchvision MobileNetV3, resized to ``widths`` when given.

    Widths that name a bare ``classifier`` (a one-Linear head, ``classifier = nn.Linear(C, K)``) give that head.
    """
    model = getattr(torchvision.models, check_arch(arch))(weights=None, num_classes=num_classes)
    if widths and "classifier" in widths:
        model.classifier = nn.Linear(widths["classifier"]["in"], widths["classifier"]["out"])
    return apply_widths(model, widths) if widths else model


def save_checkpoint(path, model, arch, class_names, config=None, extra=None):
    """Save ``model`` as our checkpoint dict (never a whole-model pickle), atomically."""
    ckpt = {
        "format": FORMAT,
        "arch": arch,
        "num_classes": len(class_names),
        "class_names": list(class_names),
        "widths": layer_widths(model),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "config": dict(config or {}),
        "versions": versions(),
        "extra": dict(extra or {}),
    }
    return save_torch(path, ckpt)


_STATE_KEYS = ("state_dict", "model_state_dict", "model", "net", "network", "module", "weights")  # looked at first
_FIRST_KEY = "features.0.0.weight"  # every MobileNetV3 state_dict has it, after any wrapper prefix
_HEADS = (
    {"classifier.weight", "classifier.bias"},
    {"classifier.0.weight", "classifier.0.bias", "classifier.3.weight", "classifier.3.bias"},
)


def _unsupported_global(err):
    """The ``module.Name`` that weights_only loading refused, read off torch's message."""
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
    return found.group(1) if found else "a Python object"


def _torch_load(path, allow_pickle):
    """What the file holds: tensors and containers with weights_only=True, any pickle with ``allow_pickle``."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "Unsupported global" not in str(err):  # garbage, not a pickle of objects
            raise PruneError(f"checkpoint {path} cannot be read: {str(err).splitlines()[0]}") from None
        if not allow_pickle:
            name = _unsupported_global(err)
            what = (
                "is a whole-model pickle"
                if name.startswith(("torch.nn.", "torchvision.models."))
                else f"holds a pickled Python object ({name})"
            )
            raise PruneError(
                f"checkpoint {path} {what}, which can run arbitrary code when loaded: "
                "set ALLOW_PICKLE=True if you trust the file"
            ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise PruneError(f"checkpoint {path} cannot be read: {str(err).splitlines()[0]}") from None
    warnings.warn(f"loading pickled objects of {path} with weights_only=False (ALLOW_PICKLE=True)", stacklevel=2)
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # unpickling a foreign file can raise anything
        raise PruneError(f"checkpoint {path} cannot be unpickled: {type(err).__name__}: {err}") from None


def _is_mbv3_state_dict(obj):
    return isinstance(obj, dict) and any(
        isinstance(k, str) and k.endswith(_FIRST_KEY) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def _state_dicts(obj, depth=0):
    """Yield the MobileNetV3 state_dicts inside ``obj`` (a model, or nested dicts/lists), known keys first."""
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    if _is_mbv3_state_dict(obj):
        yield obj
    elif depth < 4 and isinstance(obj, dict):
        keys = [k for k in _STATE_KEYS if k in obj] + [k for k in obj if k not in _STATE_KEYS]
        for k in keys:
            yield from _state_dicts(obj[k], depth + 1)


def _strip_wrapper(state_dict, path):
    """The state_dict without its wrapper prefix (``module.``, ``_orig_mod.``, a Lightning attribute, any mix)."""
    prefixes = sorted({k[: -len(_FIRST_KEY)] for k in state_dict if k.endswith(_FIRST_KEY)})
    if len(prefixes) > 1:
        raise PruneError(
            f"checkpoint {path} holds several MobileNetV3 state_dicts (under "
            f"{', '.join(p or '(no prefix)' for p in prefixes)}): save the one to prune on its own"
        )
    prefix = prefixes[0]
    return {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix) and isinstance(v, torch.Tensor)}


def _plain_state_dict(obj, path):
    """The state_dict inside a loaded object: bare, in any dict (``model``, ``state_dict``, ...), behind any
    wrapper prefix, or (``ALLOW_PICKLE``) the state_dict of a pickled model."""
    found = next(_state_dicts(obj), None)
    if found is not None:
        return _strip_wrapper(found, path)
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise PruneError(
            f"checkpoint {path} is not a torchvision MobileNetV3 state_dict (no key ending in {_FIRST_KEY})"
        )
    raise PruneError(f"checkpoint {path} holds no MobileNetV3 state_dict (no key ending in {_FIRST_KEY})")


def head_classes(state_dict, path):
    """The class count of a one-Linear head or torchvision's 4-layer classifier; other heads are refused."""
    keys = {k for k in state_dict if k.startswith("classifier.")}
    if keys not in _HEADS:
        closest = _HEADS[1] if keys & _HEADS[1] else _HEADS[0]
        name = (sorted(keys - _HEADS[0] - _HEADS[1]) or sorted(closest - keys) or sorted(keys))[0]
        raise PruneError(
            f"checkpoint {path} has a classifier this project cannot rebuild (key {name}): use "
            "nn.Linear(C, K) or torchvision's Linear, Hardswish, Dropout, Linear"
        )
    last = "classifier.weight" if "classifier.weight" in keys else "classifier.3.weight"
    return state_dict[last].shape[0]


def infer_arch(state_dict, path):
    for arch, key in _LAST_FEATURE.items():
        if key in state_dict and "features.1.block.0.0.weight" in state_dict:
            return arch
    raise PruneError(
        f"checkpoint {path} is not a torchvision MobileNetV3 state_dict (no {' or '.join(_LAST_FEATURE.values())})"
    )


def widths_from_state_dict(arch, state_dict, num_classes):
    """Widths read off the tensors' shapes (depthwise convs stay depthwise): rebuilds pruned state_dicts too."""
    widths = layer_widths(build_model(arch, num_classes))
    if "classifier.weight" in state_dict:  # a one-Linear head
        widths = {k: w for k, w in widths.items() if not k.startswith("classifier.")}
        widths["classifier"] = {"in": 0, "out": 0}
    for name, w in widths.items():
        weight = state_dict.get(f"{name}.weight")
        if weight is None:
            continue
        if "features" in w:
            w["features"] = weight.shape[0]
        elif "groups" in w and w["groups"] > 1:
            w["in"] = w["out"] = w["groups"] = weight.shape[0]
        else:
            w["out"], w["in"] = weight.shape[0], weight.shape[1]
    return widths


def model_from_state_dict(arch, state_dict, widths, num_classes, path):
    model = build_model(arch, num_classes, widths)
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as err:
        lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
        raise PruneError(f"checkpoint {path} does not fit {arch}: {' '.join(lines[1:3])[:300]}") from None
    return model


def imagenet_weights_path(arch):
    """Where torchvision keeps the ImageNet weights of ``arch`` in the local torch cache."""
    weights = torchvision.models.get_weight(_WEIGHTS[check_arch(arch)])
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url)), weights


def load_imagenet(arch):
    """torchvision's ImageNet weights from the local cache; never downloads."""
    path, weights = imagenet_weights_path(arch)
    if not os.path.exists(path):
        raise PruneError(
            f"ImageNet weights for {arch} are not in the local torch cache: put {os.path.basename(path)} "
            f"(from {weights.url}) at {path}"
        )
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    model = model_from_state_dict(arch, state_dict, None, 1000, path)
    return model, {
        "arch": arch,
        "class_names": list(weights.meta["categories"]),
        "format": "torchvision-imagenet",
        "path": path,
    }


def load_checkpoint(path, arch=None, allow_pickle=False):
    """(model on CPU in eval mode, meta) from our checkpoint, a plain state_dict, or (``allow_pickle``) a pickle.

    ``path == "imagenet"`` loads torchvision's ImageNet weights from the local cache. ``arch``, when given,
    must agree with the checkpoint.
    """
    if path == "imagenet":
        model, meta = load_imagenet(check_arch(arch or ARCHS[0]))
        return model.eval(), meta
    if not os.path.isfile(path):
        raise PruneError(f"checkpoint {path} does not exist")
    obj = _torch_load(path, allow_pickle)
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        ckpt_arch, widths, state_dict = check_arch(obj["arch"]), obj["widths"], obj["state_dict"]
        class_names = list(obj["class_names"])
        meta = {k: v for k, v in obj.items() if k != "state_dict"}
    else:
        state_dict = _plain_state_dict(obj, path)
        ckpt_arch = infer_arch(state_dict, path)
        num_classes = head_classes(state_dict, path)
        class_names = [f"class_{i}" for i in range(num_classes)]
        widths = widths_from_state_dict(ckpt_arch, state_dict, num_classes)
        meta = {
            "format": "state_dict",
            "arch": ckpt_arch,
            "num_classes": num_classes,
            "class_names": class_names,
            "widths": widths,
            "config": {},
            "extra": {},
        }
    if arch is not None and check_arch(arch) != ckpt_arch:
        raise PruneError(f"checkpoint {path} is a {ckpt_arch}, but MODEL_ARCH={arch}")
    model = model_from_state_dict(ckpt_arch, state_dict, widths, len(class_names), path)
    meta["path"] = path
    return model.eval(), meta


def load_model(path, device="cpu", allow_pickle=False):
    """A ready model (eval mode, on ``device``) from any checkpoint this project reads: the notebook entry point."""
    model, _ = load_checkpoint(path, allow_pickle=allow_pickle)
    return model.to(pick_device(device) if isinstance(device, str) else device)
