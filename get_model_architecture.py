"""Per-block architecture table: channels, kernel, stride, SE, activation, params, MACs and MACs share.

Reads:  CHECKPOINT (default RUN_DIR/baseline.pt), and optionally COMPARE (a second checkpoint, e.g. the
        pruned one) to print both side by side with the differences.
Writes: RUN_DIR/architecture.json (the table of CHECKPOINT, and of COMPARE when given).
MACs are counted with torch-pruning's count_ops_and_params on one IMAGE_SIZE x IMAGE_SIZE image.

    python get_model_architecture.py --RUN_DIR=runs/demo --COMPARE=runs/demo/pruned.pt
"""

from mbv3prune import config, models, stage
from mbv3prune.artifacts import provenance, write_json
from mbv3prune.blocks import find_blocks
from mbv3prune.prune import block_macs, count_macs_params

# -----------------------------------------------------------------------------
RUN_DIR = "runs/demo"  # where every stage reads and writes its artifacts
MODEL_ARCH = "mobilenet_v3_large"  # mobilenet_v3_large or mobilenet_v3_small (must match the checkpoint)
CHECKPOINT = ""  # checkpoint to describe ("" = RUN_DIR/baseline.pt; "imagenet" = torchvision weights in the cache)
COMPARE = ""  # a second checkpoint to print side by side ("" = none)
ALLOW_PICKLE = False  # allow whole-model pickles (runs code from the file: only if you trust it)
IMAGE_SIZE = 64  # input resolution MACs are counted at
OUT = ""  # output file ("" = RUN_DIR/architecture.json)
DEBUG = False  # show tracebacks of the project's errors
# -----------------------------------------------------------------------------


def describe(model, image_size):
    """{"total_macs", "total_params", "blocks": {block: in/hidden/out, kernel, stride, SE, act, params, MACs}}."""
    blocks = find_blocks(model)
    macs, params = count_macs_params(model, image_size)
    per_block = block_macs(model, blocks, image_size)
    table = {}
    for name, r in blocks.items():
        module = model.get_submodule(name)
        table[name] = {
            "in": r["in_channels"],
            "hidden": r["hidden_channels"],
            "out": r["out_channels"],
            "kernel": r["kernel"],
            "stride": r["stride"],
            "se": r["has_se"],
            "activation": r["activation"],
            "params": sum(p.numel() for p in module.parameters()),
            "macs": per_block[name],
            "macs_share": round(per_block[name] / macs, 6),
        }
    return {"total_macs": macs, "total_params": params, "blocks": table}


def print_one(d):
    rows = [
        [
            b,
            r["in"],
            r["hidden"],
            r["out"],
            r["kernel"],
            r["stride"],
            "yes" if r["se"] else "no",
            r["activation"],
            r["params"],
            r["macs"],
            f"{100 * r['macs_share']:.1f}%",
        ]
        for b, r in d["blocks"].items()
    ]
    print(stage.table(rows, ["block", "in", "hidden", "out", "k", "s", "SE", "act", "params", "MACs", "share"]))
    print(f"total: {d['total_macs']:,} MACs, {d['total_params']:,} params")


def print_compare(a, b):
    rows = []
    for name, r in a["blocks"].items():
        s = b["blocks"].get(name, {})
        changed = "*" if s.get("hidden") != r["hidden"] else ""
        rows.append(
            [
                name + changed,
                r["hidden"],
                s.get("hidden"),
                r["macs"],
                s.get("macs"),
                f"{100 * r['macs_share']:.1f}%",
                f"{100 * s.get('macs_share', 0):.1f}%",
            ]
        )
    print(stage.table(rows, ["block", "hidden A", "hidden B", "MACs A", "MACs B", "share A", "share B"]))
    for key in ("total_macs", "total_params"):
        print(f"{key}: {a[key]:,} -> {b[key]:,} ({100 * (b[key] - a[key]) / a[key]:+.1f}%)")
    print("(* = block whose hidden width differs)")


def main(cfg):
    checkpoint = config.path_or_default(cfg, "CHECKPOINT", "baseline.pt")
    model, meta = models.load_checkpoint(checkpoint, cfg["MODEL_ARCH"], cfg["ALLOW_PICKLE"])
    result = {
        "schema_version": 1,
        "kind": "mbv3prune-architecture",
        "arch": meta["arch"],
        "image_size": cfg["IMAGE_SIZE"],
        "checkpoint": describe(model, cfg["IMAGE_SIZE"]),
    }
    inputs = {"checkpoint": checkpoint} if checkpoint != "imagenet" else {}
    if cfg["COMPARE"]:
        other, _ = models.load_checkpoint(cfg["COMPARE"], cfg["MODEL_ARCH"], cfg["ALLOW_PICKLE"])
        result["compare"] = describe(other, cfg["IMAGE_SIZE"])
        inputs["compare"] = cfg["COMPARE"]
        print_compare(result["checkpoint"], result["compare"])
    else:
        print_one(result["checkpoint"])
    result["provenance"] = provenance(cfg, inputs)
    out = write_json(config.path_or_default(cfg, "OUT", "architecture.json"), result)
    stage.finish([out], f"python visualize_neuron_activations.py --RUN_DIR={cfg['RUN_DIR']}")


if __name__ == "__main__":
    config.run(main, globals())
