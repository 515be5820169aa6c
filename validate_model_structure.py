"""Validate a (pruned) MobileNetV3: forward passes, layer consistency, promised widths, export, vs the original.

Reads:  CHECKPOINT (default RUN_DIR/pruned.pt), ORIGINAL (default RUN_DIR/baseline.pt when present) and
        REPORT (default RUN_DIR/pruning_report.json when present: the widths the pruning promised);
        DATA_DIR for real validation images.
Writes: RUN_DIR/validation.json — every check with its result and details.
Checks: no NaN/inf on random and real input; output width = number of classes; every depthwise conv has
in == out == groups; every BN matches its conv; SE fc1 in == fc2 out == the block's hidden width; widths
equal the report's; torch.export (or jit.trace) runs and matches eager output. Against the original: top-1
agreement, mean and max logit difference, accuracy of both. Exits non-zero naming the failed checks.

    python validate_model_structure.py --RUN_DIR=runs/demo
"""

import os

import torch
from torchvision.models.mobilenetv3 import InvertedResidual
from torchvision.ops.misc import Conv2dNormActivation

from mbv3prune import config, models, stage
from mbv3prune.artifacts import provenance, read_json, write_json
from mbv3prune.blocks import find_blocks
from mbv3prune.data import Skipped, batches, eval_split
from mbv3prune.errors import PruneError

# -----------------------------------------------------------------------------
DATA_DIR = "data/synthetic-species"  # data set whose validation images are used for the real-image checks
RUN_DIR = "runs/demo"  # where every stage reads and writes its artifacts
MODEL_ARCH = "mobilenet_v3_large"  # mobilenet_v3_large or mobilenet_v3_small (must match the checkpoints)
CHECKPOINT = ""  # model to validate ("" = RUN_DIR/pruned.pt)
ORIGINAL = ""  # model to compare with ("" = RUN_DIR/baseline.pt when it exists; "none" = no comparison)
REPORT = ""  # pruning report with the promised widths ("" = RUN_DIR/pruning_report.json when it exists; "none")
ALLOW_PICKLE = False  # allow whole-model pickles (runs code from the file: only if you trust it)
IMAGE_SIZE = 64  # input resolution
BATCH_SIZE = 64  # images per batch
NUM_WORKERS = 2  # data-loading worker processes
MAX_IMAGES = 512  # real validation images used (0 = all)
EXPORT = "export"  # export (torch.export), trace (jit.trace), onnx (both models, timed in onnxruntime), none
TOLERANCE = 1e-4  # max abs difference allowed between exported and eager logits
DEVICE = "auto"  # auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps
SEED = 0  # seeds the random input and the data split
DEBUG = False  # show tracebacks of the project's errors
# -----------------------------------------------------------------------------


def check(name, ok, detail=""):
    return {"check": name, "ok": bool(ok), "detail": detail}


def spatial_convs(model):
    """[(name, conv)] of the k x k convs inside every InvertedResidual: the depthwise ones, found without asking
    whether they are depthwise (the block finder only finds blocks whose depthwise conv is intact)."""
    return [
        (f"{block}.{name}", m)
        for block, ir in model.named_modules()
        if isinstance(ir, InvertedResidual)
        for name, m in ir.named_modules()
        if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1)
    ]


def structure_checks(model, num_classes):
    """Depthwise, BN-vs-conv, SE and classifier widths."""
    out, bad = [], []
    for name, m in model.named_modules():
        if isinstance(m, Conv2dNormActivation) and m[0].out_channels != m[1].num_features:
            bad.append(f"{name}: conv out {m[0].out_channels} != BN {m[1].num_features}")
    out.append(check("bn_matches_conv", not bad, "; ".join(bad[:5])))
    bad_dw = [
        f"{name}: in {dw.in_channels} out {dw.out_channels} groups {dw.groups}"
        for name, dw in spatial_convs(model)
        if not dw.in_channels == dw.out_channels == dw.groups
    ]
    bad_se = []
    try:
        blocks = find_blocks(model)
    except PruneError as err:  # e.g. a depthwise conv that is no longer depthwise: its block is unrecognisable
        blocks = {}
        out.append(check("blocks_recognised", False, str(err)))
    for block, r in blocks.items():
        if "se" in r:
            fc1, fc2 = model.get_submodule(r["se_fc1"]), model.get_submodule(r["se_fc2"])
            if not fc1.in_channels == fc2.out_channels == r["hidden_channels"] or fc1.out_channels != fc2.in_channels:
                bad_se.append(
                    f"{block}: fc1 {fc1.in_channels}->{fc1.out_channels}, fc2 {fc2.in_channels}->"
                    f"{fc2.out_channels}, hidden {r['hidden_channels']}"
                )
    out.append(check("depthwise_in_out_groups", not bad_dw, "; ".join(bad_dw[:5])))
    out.append(check("se_widths", not bad_se, "; ".join(bad_se[:5])))
    head = models.head(model).out_features
    out.append(check("output_width", head == num_classes, f"{head} outputs, {num_classes} classes"))
    return out


def promised_widths_check(model, report_path):
    report = read_json(report_path, "pruning report")
    promised = report.get("pruned_widths")
    if promised is None:
        return check("widths_as_reported", False, f"{report_path} has no pruned_widths")
    actual = models.layer_widths(model)
    diff = [k for k in sorted(set(promised) | set(actual)) if promised.get(k) != actual.get(k)]
    return check("widths_as_reported", not diff, f"differs at {', '.join(diff[:5])}" if diff else report_path)


@torch.inference_mode()
def logits_on(model, loader, device, limit):
    outs, labels, skipped = [], [], Skipped()
    for images, y in batches(loader, skipped, device):
        outs.append(model(images).float().cpu()), labels.append(y.cpu())
        if limit and sum(len(o) for o in outs) >= limit:
            break
    return torch.cat(outs)[: limit or None], torch.cat(labels)[: limit or None]


def export_check(model, image_size, how, tol):
    if how == "none":
        return check("export", True, "skipped (EXPORT=none)")
    x = torch.randn(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(1))
    model = model.cpu().eval()
    with torch.no_grad():
        eager = model(x)
        if how == "export":
            exported = torch.export.export(model, (x,)).module()
        elif how == "trace":
            exported = torch.jit.trace(model, x)
        else:
            raise PruneError(f"unknown EXPORT {how!r}: use export, trace, onnx or none")
        diff = float((exported(x) - eager).abs().max())
    return check("export", diff <= tol, f"torch.{'export' if how == 'export' else 'jit.trace'}: max |diff| {diff:.2e}")


def onnx_check(model, original, cfg):
    """EXPORT=onnx: RUN_DIR/pruned.onnx (and baseline.onnx for the original) checked against eager and timed in
    onnxruntime and eager at batch 1 and 32 with torch's thread count; (check, {name: record})."""
    from mbv3prune.onnx_export import export_checked

    records, models_ = {}, {"pruned": model, **({"baseline": original} if original is not None else {})}
    try:
        for name, m in models_.items():
            path = os.path.join(cfg["RUN_DIR"], f"{name}.onnx")
            records[name] = export_checked(m.cpu().eval(), path, cfg["IMAGE_SIZE"], atol=cfg["TOLERANCE"])
    except PruneError as err:
        return check("export", False, str(err)), records
    lat = {n: r["latency_ms"]["onnxruntime"] for n, r in records.items()}
    detail = ", ".join(f"{n} b1 {v[1]:.3g} ms b32 {v[32]:.3g} ms" for n, v in lat.items())
    return check("export", True, f"onnxruntime matches eager; {detail}"), records


def compare(logits, ref_logits, labels):
    agree = float((logits.argmax(1) == ref_logits.argmax(1)).float().mean())
    d = (logits - ref_logits).abs()
    return {
        "top1_agreement": round(agree, 6),
        "mean_logit_diff": round(float(d.mean()), 6),
        "max_logit_diff": round(float(d.max()), 6),
        "top1": round(float((logits.argmax(1) == labels).float().mean()), 6),
        "original_top1": round(float((ref_logits.argmax(1) == labels).float().mean()), 6),
    }


def main(cfg):
    torch.manual_seed(cfg["SEED"])
    device = models.pick_device(cfg["DEVICE"])
    path = config.path_or_default(cfg, "CHECKPOINT", "pruned.pt")
    model, meta = models.load_checkpoint(path, cfg["MODEL_ARCH"], cfg["ALLOW_PICKLE"])
    original = config.path_or_default(cfg, "ORIGINAL", "baseline.pt")
    original = None if cfg["ORIGINAL"] == "none" or (not cfg["ORIGINAL"] and not os.path.exists(original)) else original
    report = config.path_or_default(cfg, "REPORT", "pruning_report.json")
    report = None if cfg["REPORT"] == "none" or (not cfg["REPORT"] and not os.path.exists(report)) else report
    cfg, splits, class_names = stage.checkpoint_data(cfg, meta)
    model.to(device)
    checks = structure_checks(model, len(class_names))
    if report:
        checks.append(promised_widths_check(model, report))
    with torch.inference_mode():
        rand = model(torch.randn(4, 3, cfg["IMAGE_SIZE"], cfg["IMAGE_SIZE"], device=device))
    checks.append(check("finite_on_random_input", torch.isfinite(rand).all(), f"output shape {tuple(rand.shape)}"))
    loader = stage.loader(cfg, splits[eval_split(splits)])
    logits, labels = logits_on(model, loader, device, cfg["MAX_IMAGES"])
    checks.append(check("finite_on_real_images", torch.isfinite(logits).all(), f"{len(labels)} images"))
    comparison, ref, onnx = None, None, None
    if original:
        ref, _ = models.load_checkpoint(original, cfg["MODEL_ARCH"], cfg["ALLOW_PICKLE"])
        ref_logits, _ = logits_on(ref.to(device), loader, device, cfg["MAX_IMAGES"])
        comparison = compare(logits, ref_logits, labels)
    if cfg["EXPORT"] == "onnx":
        exported, onnx = onnx_check(model, ref, cfg)
        checks.append(exported)
    else:
        checks.append(export_check(model, cfg["IMAGE_SIZE"], cfg["EXPORT"], cfg["TOLERANCE"]))
    inputs = {
        "checkpoint": path,
        **({"original": original} if original else {}),
        **({"report": report} if report else {}),
    }
    result = {
        "schema_version": 1,
        "kind": "mbv3prune-validation",
        "checkpoint": path,
        "passed": all(c["ok"] for c in checks),
        "checks": checks,
        "comparison": comparison,
        **({"onnx": onnx} if onnx is not None else {}),
        "provenance": provenance(cfg, inputs),
    }
    out = write_json(os.path.join(cfg["RUN_DIR"], "validation.json"), result)
    print(
        stage.table(
            [[c["check"], "ok" if c["ok"] else "FAILED", c["detail"]] for c in checks], ["check", "result", "detail"]
        )
    )
    if comparison:
        print("\n" + stage.table([[k, v] for k, v in comparison.items()], ["against the original", "value"]))
    stage.finish([out], f"python visualize_activation_overlay_image.py --RUN_DIR={cfg['RUN_DIR']}")
    failed = [c["check"] for c in checks if not c["ok"]]
    if failed:
        raise PruneError(f"{path} failed {len(failed)} check(s): {', '.join(failed)} (details in {out})")


if __name__ == "__main__":
    config.run(main, globals())
