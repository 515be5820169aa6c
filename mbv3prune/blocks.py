"""The roles of every inverted-residual block of a MobileNetV3, found by module type, not by name.

A block's roles: ``expand`` (1x1 conv, absent when the block has no expansion), ``depthwise`` (in == out
== groups), ``se`` with ``se_fc1`` / ``se_fc2`` (absent in blocks without squeeze-excitation) and
``project`` (1x1 conv), each conv with the BN (``*_bn``) and activation (``*_act``) that follow it.
Works on Large, Small, any width_mult, and pruned models.
"""

from torch import nn
from torchvision.models.mobilenetv3 import InvertedResidual
from torchvision.ops import SqueezeExcitation

from .errors import PruneError

ROLES = (
    "expand",
    "expand_bn",
    "expand_act",
    "depthwise",
    "depthwise_bn",
    "depthwise_act",
    "se",
    "se_fc1",
    "se_fc2",
    "project",
    "project_bn",
)
_ACTIVATIONS = (nn.ReLU, nn.Hardswish, nn.ReLU6, nn.SiLU, nn.GELU)


def _is_depthwise(conv):
    return conv.groups > 1 and conv.groups == conv.in_channels == conv.out_channels


def block_roles(prefix, block):
    """Roles of one InvertedResidual: {role: module name} plus widths, residual and activation."""
    convs, roles, current = [], {}, None
    for name, mod in block.named_modules(prefix=prefix):
        if isinstance(mod, SqueezeExcitation):
            roles["se"], roles["se_fc1"], roles["se_fc2"] = name, f"{name}.fc1", f"{name}.fc2"
            current = "se"
        elif isinstance(mod, nn.Conv2d) and not (current == "se" and name.startswith(roles["se"] + ".")):
            convs.append((name, mod))
            current = "depthwise" if _is_depthwise(mod) else "project" if "depthwise" in roles else "expand"
            if current in roles:
                raise PruneError(f"block {prefix}: two {current} convs ({roles[current]}, {name})")
            roles[current] = name
        elif isinstance(mod, nn.BatchNorm2d) and current in ("expand", "depthwise", "project"):
            roles.setdefault(f"{current}_bn", name)
        elif isinstance(mod, _ACTIVATIONS) and current in ("expand", "depthwise"):
            roles.setdefault(f"{current}_act", name)
    missing = [r for r in ("depthwise", "depthwise_bn", "project", "project_bn") if r not in roles]
    if missing:
        raise PruneError(f"block {prefix} is not a MobileNetV3 inverted residual: no {', '.join(missing)}")
    modules = dict(block.named_modules(prefix=prefix))
    dw, proj = modules[roles["depthwise"]], modules[roles["project"]]
    first = modules[roles.get("expand", roles["depthwise"])]
    act = modules.get(roles.get("depthwise_act"))
    return {
        **{r: roles[r] for r in ROLES if r in roles},
        "in_channels": first.in_channels,
        "hidden_channels": dw.out_channels,
        "out_channels": proj.out_channels,
        "kernel": dw.kernel_size[0],
        "stride": dw.stride[0],
        "activation": type(act).__name__ if act is not None else None,
        "has_se": "se" in roles,
        "has_residual": bool(getattr(block, "use_res_connect", False)),
    }


def find_blocks(model):
    """{block name: roles} for every inverted-residual block of ``model``, in forward order."""
    blocks = {name: block_roles(name, mod) for name, mod in model.named_modules() if isinstance(mod, InvertedResidual)}
    if not blocks:
        raise PruneError(f"model {type(model).__name__} has no MobileNetV3 inverted-residual blocks")
    return blocks


CAPTURE_POINTS = ("project_input", "activation", "conv_output")


def check_capture_point(capture_point):
    """``capture_point``, or a PruneError listing the valid ones."""
    if capture_point not in CAPTURE_POINTS:
        raise PruneError(f"unknown CAPTURE_POINT {capture_point!r}: use one of {', '.join(CAPTURE_POINTS)}")
    return capture_point


def capture_layer(roles, capture_point):
    """The module whose tensor a block is scored on (see CAPTURE_POINTS)."""
    if check_capture_point(capture_point) == "project_input":
        return roles["project"]
    if capture_point == "activation":
        return roles.get("depthwise_act", roles["depthwise_bn"])
    return roles["depthwise"]


def prunable(roles):
    """Whether a block's hidden channels can be pruned: only with an expand conv (else they are the block's
    input channels, tied to the stem and the residual path)."""
    return "expand" in roles


def skip_reason(name, roles, skip_blocks=()):
    """Why block ``name`` is not pruned (None when it may be)."""
    if name in skip_blocks:
        return "listed in SKIP_BLOCKS"
    if not prunable(roles):
        return "no expand conv: its hidden channels are the block's input"
    return None
