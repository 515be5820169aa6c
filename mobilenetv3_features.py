"""Find the roles of every inverted-residual block: expand / depthwise / SE fc1 / SE fc2 / project convs.

Reads:  CHECKPOINT (default RUN_DIR/baseline.pt; any checkpoint the project loads, pruned or not).
Writes: RUN_DIR/mobilenetv3_block_structure.json — block name -> module names of expand, expand_bn,
        expand_act, depthwise, depthwise_bn, depthwise_act, se, se_fc1, se_fc2, project, project_bn (absent
        roles omitted), hidden_channels, has_residual, ...; plus the model's per-layer widths and provenance.
Blocks are found by module type (torchvision's InvertedResidual), not by hard-coded names, so Large,
Small, any width_mult and pruned models work.

    python mobilenetv3_features.py --RUN_DIR=runs/demo
"""

import os

from mbv3prune import config, models, stage
from mbv3prune.artifacts import provenance, write_json
from mbv3prune.blocks import find_blocks

# -----------------------------------------------------------------------------
RUN_DIR = "runs/demo"  # where every stage reads and writes its artifacts
MODEL_ARCH = "mobilenet_v3_large"  # mobilenet_v3_large or mobilenet_v3_small (must match the checkpoint)
CHECKPOINT = ""  # checkpoint to describe ("" = RUN_DIR/baseline.pt; "imagenet" = torchvision weights in the cache)
ALLOW_PICKLE = False  # allow CHECKPOINT to be a whole-model pickle (runs code from the file: only if you trust it)
OUT = ""  # output file ("" = RUN_DIR/mobilenetv3_block_structure.json)
DEBUG = False  # show tracebacks of the project's errors
# -----------------------------------------------------------------------------


def structure(model, arch, checkpoint, cfg):
    """The block-structure artifact: roles of every block, per-layer widths, provenance."""
    inputs = {"checkpoint": checkpoint} if os.path.isfile(checkpoint) else {}
    return {
        "schema_version": 1,
        "kind": "mbv3prune-block-structure",
        "arch": arch,
        "blocks": find_blocks(model),
        "widths": models.layer_widths(model),
        "provenance": provenance(cfg, inputs),
    }


def main(cfg):
    checkpoint = config.path_or_default(cfg, "CHECKPOINT", "baseline.pt")
    model, meta = models.load_checkpoint(checkpoint, cfg["MODEL_ARCH"], cfg["ALLOW_PICKLE"])
    result = structure(model, meta["arch"], checkpoint, cfg)
    out = write_json(config.path_or_default(cfg, "OUT", "mobilenetv3_block_structure.json"), result)
    rows = [
        [
            name,
            r.get("expand", "-"),
            r["depthwise"],
            r.get("se_fc1", "-"),
            r.get("se_fc2", "-"),
            r["project"],
            r["hidden_channels"],
            "yes" if r["has_residual"] else "no",
        ]
        for name, r in result["blocks"].items()
    ]
    print(stage.table(rows, ["block", "expand", "depthwise", "se_fc1", "se_fc2", "project", "hidden", "residual"]))
    print(f"\n{len(rows)} inverted-residual blocks in {meta['arch']} ({checkpoint})")
    stage.finish([out], f"python get_model_architecture.py --RUN_DIR={cfg['RUN_DIR']}")


if __name__ == "__main__":
    config.run(main, globals())
