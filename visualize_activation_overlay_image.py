"""Channel-mean activation heat maps overlaid on images, for the original and the pruned model side by side.

Reads:  CHECKPOINT (default RUN_DIR/baseline.pt) and PRUNED (default RUN_DIR/pruned.pt when it exists);
        IMAGES (paths), or by default one image per class from the validation split of DATA_DIR.
Writes: RUN_DIR/overlays/<model>_img<i>_<layer>_<module>_<channels>ch_k<k>s<s>.png (one overlay per image,
        layer and model) and RUN_DIR/overlays/panel_img<i>.png (original vs pruned, the same layers, each
        model's predicted class and confidence).
The heat map is the mean |activation| over channels of the tensor each block is scored on (CAPTURE_POINT),
upsampled to the image. Default layers: the blocks at the quarter points of the block list.

    python visualize_activation_overlay_image.py --RUN_DIR=runs/demo --IMAGES="['photo.jpg']"
"""

import os

import numpy as np
import torch

from mbv3prune import config, models, plots, stage
from mbv3prune.blocks import check_capture_point, find_blocks
from mbv3prune.capture import attached_hooks, describe_layers
from mbv3prune.data import eval_split, eval_transform, open_rgb
from mbv3prune.errors import PruneError

# -----------------------------------------------------------------------------
DATA_DIR = "data/synthetic-species"  # data set the default images come from (its validation split)
RUN_DIR = "runs/demo"  # where every stage reads and writes its artifacts
MODEL_ARCH = "mobilenet_v3_large"  # mobilenet_v3_large or mobilenet_v3_small (must match the checkpoints)
CHECKPOINT = ""  # the original model ("" = RUN_DIR/baseline.pt)
PRUNED = ""  # the pruned model ("" = RUN_DIR/pruned.pt when it exists; "none" = original only)
ALLOW_PICKLE = False  # allow whole-model pickles (runs code from the file: only if you trust it)
IMAGES = []  # image paths to overlay ([] = one image per class from the validation split)
MAX_IMAGES = 8  # at most this many default images
LAYERS = []  # blocks to show ([] = the quarter points: features.6/.9/.12/.15 in Large, .3/.6/.9/.11 in Small)
CAPTURE_POINT = "project_input"  # the tensor shown per block: project_input, activation or conv_output
IMAGE_SIZE = 64  # model input resolution
DEVICE = "auto"  # auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps
SEED = 0  # seeds the data split the default images come from
DEBUG = False  # show tracebacks of the project's errors
# -----------------------------------------------------------------------------
QUARTER_BLOCKS = {
    "mobilenet_v3_large": ["features.6", "features.9", "features.12", "features.15"],
    "mobilenet_v3_small": ["features.3", "features.6", "features.9", "features.11"],
}


def default_images(cfg):
    splits, class_names = stage.prepare_data(cfg)
    items = splits[eval_split(splits)]
    first = {}
    for path, label in items:
        first.setdefault(label, path)
    return [first[k] for k in sorted(first)][: cfg["MAX_IMAGES"]]


def layer_description(model, layer, info):
    """E.g. 'Conv2d_160ch_k1s1': the hooked module, the captured channels, kernel and stride."""
    m = model.get_submodule(layer)
    kernel = getattr(m, "kernel_size", None)
    ks = f"_k{kernel[0]}s{m.stride[0]}" if kernel else ""
    return f"{type(m).__name__}_{info['channels']}ch{ks}"


def heat_maps(model, x, blocks, layers, capture_point):
    """({block: {"map": [h, w] mean |a|, "desc"}}, predicted class, confidence) for one image."""
    described = {
        info["block"]: (layer, info)
        for layer, info in describe_layers(blocks, capture_point).items()
        if info["proposal"]
    }
    maps = {}
    hooks = [
        (described[b][0], described[b][1]["hook"], lambda t, b=b: maps.__setitem__(b, t[0].abs().mean(0).float().cpu()))
        for b in layers
    ]
    with attached_hooks(model, hooks), torch.inference_mode():
        probs = model(x).float().softmax(1)[0]
    heats = {
        b: {"map": maps[b], "desc": f"{described[b][0]}_{layer_description(model, described[b][0], described[b][1])}"}
        for b in layers
    }
    return heats, int(probs.argmax()), float(probs.max())


def load_models(cfg):
    original = config.path_or_default(cfg, "CHECKPOINT", "baseline.pt")
    loaded = [("original", *models.load_checkpoint(original, cfg["MODEL_ARCH"], cfg["ALLOW_PICKLE"]))]
    pruned = config.path_or_default(cfg, "PRUNED", "pruned.pt")
    if cfg["PRUNED"] != "none" and (cfg["PRUNED"] or os.path.exists(pruned)):
        loaded.append(("pruned", *models.load_checkpoint(pruned, cfg["MODEL_ARCH"], cfg["ALLOW_PICKLE"])))
    return loaded


def main(cfg):
    check_capture_point(cfg["CAPTURE_POINT"])
    device = models.pick_device(cfg["DEVICE"])
    loaded = load_models(cfg)
    arch = loaded[0][2]["arch"]
    layers = cfg["LAYERS"] or QUARTER_BLOCKS[arch]
    blocks = {tag: _blocks(model, layers, tag) for tag, model, _ in loaded}
    images = cfg["IMAGES"] or default_images(stage.with_split_seed(cfg, loaded[0][2]))
    for path in images:
        if not os.path.isfile(path):
            raise PruneError(f"image {path} does not exist")
    transform = eval_transform(cfg["IMAGE_SIZE"], arch)
    out_dir, wrote, rows = os.path.join(cfg["RUN_DIR"], "overlays"), [], []
    for i, path in enumerate(images):
        try:
            pil = open_rgb(path)
        except OSError as err:
            raise PruneError(f"image {path} cannot be read: {err}") from None
        x = transform(pil)[None].to(device)
        shown = np.asarray(pil.resize((256, int(256 * pil.height / pil.width))))
        panel_rows = []
        for tag, model, meta in loaded:
            heats, pred, conf = heat_maps(model.to(device), x, blocks[tag], layers, cfg["CAPTURE_POINT"])
            label = meta["class_names"][pred]
            panel_rows.append({"label": tag, "prediction": f"{label} ({conf:.2f})", "heats": heats})
            rows.append([os.path.basename(path), tag, label, round(conf, 3)])
            for b in layers:
                name = f"{tag}_img{i:02d}_{heats[b]['desc'].replace('.', '_')}.png"
                wrote.append(
                    plots.single_overlay(
                        shown, heats[b]["map"], f"{tag}: {b}\n{heats[b]['desc']}", os.path.join(out_dir, name)
                    )
                )
        wrote.append(
            plots.before_after_panel(shown, panel_rows, layers, os.path.join(out_dir, f"panel_img{i:02d}.png"))
        )
    print(stage.table(rows, ["image", "model", "predicted", "confidence"]))
    stage.finish(
        [p for p in wrote if "panel" in p] + [f"{out_dir}/ ({len(wrote)} figures)"],
        "look at the panels; then re-run the pipeline on your own data (see README)",
    )


def _blocks(model, layers, tag):
    blocks = find_blocks(model)
    unknown = [b for b in layers if b not in blocks]
    if unknown:
        raise PruneError(
            f"LAYERS names {', '.join(unknown)}, not blocks of the {tag} model (blocks: {', '.join(blocks)})"
        )
    return blocks


if __name__ == "__main__":
    config.run(main, globals())
