"""The pruning stage's report: the JSON record (byte-stable: no timings, except target_latency's measured
rounds, which its plan depends on), latency, and the summary tables."""

from . import models, stage
from .artifacts import provenance
from .blocks import find_blocks, prunable
from .data import Skipped, batches
from .evaluate import file_size_mb, flag_class_drops
from .experiment import delivered_step, eval_accuracy, latencies, recalibrated, val_top1
from .prune import block_macs, count_macs_params
from .reconstruct import block_errors


def _blocks(run, chosen):
    return {
        name: {
            "before": r["hidden_channels"],
            "after": r["hidden_channels"] - len(chosen.get(name, [])),
            "removed": chosen.get(name, []),
            **({} if prunable(r) else {"skipped": "no expand conv"}),
        }
        for name, r in run.blocks.items()
    }


def pruning_report(run, cfg, pruned, chosen, how, extra, accuracy, out):
    """The pruning report dict; ``accuracy`` {step: accuracy} loses its per-image ``correct`` lists."""
    after_macs, after_params = count_macs_params(pruned, cfg["IMAGE_SIZE"])
    last = delivered_step(accuracy)
    flagged = flag_class_drops(accuracy["baseline"], accuracy[last])
    for acc in accuracy.values():
        acc.pop("correct", None)
    return {
        "schema_version": 1,
        "kind": "mbv3prune-pruning-report",
        "how": how,
        **extra,
        "compensated": cfg["COMPENSATE"],
        "reconstruct": cfg.get("RECONSTRUCT", "none"),
        "blocks": _blocks(run, chosen),
        "before": {"macs": run.total, "params": run.params, "checkpoint_mb": file_size_mb(run.checkpoint)},
        "after": {"macs": after_macs, "params": after_params, "checkpoint_mb": file_size_mb(out)},
        "macs_reduction": round(1 - after_macs / run.total, 6),
        "params_reduction": round(1 - after_params / run.params, 6),
        "accuracy": accuracy,
        "flagged_classes": {"step": last, "drop_over_10_points": flagged},
        "pruned_widths": models.layer_widths(pruned),
        "provenance": provenance(cfg, {"checkpoint": run.checkpoint, "plan": run.plan_path}),
    }


def block_output_errors(run, pruned):
    """{block: relative output error of ``pruned`` against the baseline on the held-out val split}."""
    return {
        b: round(e, 6)
        for b, e in block_errors(
            run.model, pruned, batches(run.loaders["val"], Skipped(), run.device), list(run.blocks)
        ).items()
    }


def baseline_recalibrated(run, cfg):
    """The unpruned baseline's top-1 after BN recalibration, as the pruned model's recalibration is done."""
    model = recalibrated(run.model, run.loaders, run.device, cfg["BN_BATCHES"])
    return {
        "top1": eval_accuracy(model, run.loaders, run.class_names, run.device, "baseline bn")["top1"],
        "val_top1": val_top1(model, run.loaders, run.class_names, run.device),
        "val_top1_before": val_top1(run.model, run.loaders, run.class_names, run.device),
    }


def latency(run, cfg, pruned):
    """{latency_ms_b1_before, ..._after, latency_ms_b32_...} (empty with LATENCY=False)."""
    if not cfg["LATENCY"]:
        return {}
    measured = {
        tag: latencies(m, cfg["IMAGE_SIZE"], run.device) for tag, m in (("before", run.model), ("after", pruned))
    }
    return {f"{k}_{tag}": v for tag, times in measured.items() for k, v in times.items()}


def _block_rows(run, chosen, pruned, total_after, image_size):
    before, after = block_macs(run.model, run.blocks, image_size), block_macs(pruned, find_blocks(pruned), image_size)
    return [
        [
            name,
            f"{r['hidden_channels']} -> {r['hidden_channels'] - len(chosen.get(name, []))}",
            f"{100 * before[name] / run.total:.1f}% -> {100 * after[name] / total_after:.1f}%",
        ]
        for name, r in run.blocks.items()
    ]


def _summary_rows(result):
    acc = result["accuracy"]
    rows = [
        ["MACs", result["before"]["macs"], result["after"]["macs"]],
        ["params", result["before"]["params"], result["after"]["params"]],
        ["checkpoint MB", result["before"]["checkpoint_mb"], result["after"]["checkpoint_mb"]],
        ["top-1 (no recovery)", acc["baseline"]["top1"], acc["pruned"]["top1"]],
    ]
    for step, label in (("bn_recalibrated", "top-1 (BN recalibrated)"), ("finetuned", "top-1 (fine-tuned)")):
        if step in acc:
            rows.append([label, acc["baseline"]["top1"], acc[step]["top1"]])
    return rows


def print_summary(run, cfg, pruned, chosen, result, timings):
    """The per-block table, the before / after table, latency and the classes that lost most."""
    rows = _block_rows(run, chosen, pruned, result["after"]["macs"], cfg["IMAGE_SIZE"])
    print("\n" + stage.table(rows, ["block", "hidden channels", "MACs share"]))
    print("\n" + stage.table(_summary_rows(result), ["", "before", "after"]))
    if timings:
        print(
            f"latency batch 1: {timings['latency_ms_b1_before']} -> {timings['latency_ms_b1_after']} ms; batch 32: "
            f"{timings['latency_ms_b32_before']} -> {timings['latency_ms_b32_after']} ms ({run.device})"
        )
    errors = result.get("block_output_error", {})
    if errors:
        worst = max(errors, key=errors.get)
        print(
            f"block output error on val (relative): worst {worst} {errors[worst]:.3f}, last "
            f"{list(errors)[-1]} {errors[list(errors)[-1]]:.3f}"
        )
    if "baseline_bn_recalibrated" in result:
        print(f"unpruned baseline after BN recalibration: top-1 {result['baseline_bn_recalibrated']['top1']:.4f}")
    for name, v in result["flagged_classes"]["drop_over_10_points"].items():
        print(
            f"WARNING class {name!r} lost {100 * (v['before'] - v['after']):.0f} points "
            f"({v['before']:.2f} -> {v['after']:.2f})"
        )


def calibration_table(rounds, best, runtime, batch):
    """The target_latency rounds: the table's aim, its prediction and the whole model's measured reduction."""
    rows = [
        [
            i + 1,
            f"{r['aim']:.3f}",
            f"{r['predicted']:.3f}",
            f"{r['measured']:.3f}",
            r["channels"],
            "<" if i == best else "",
        ]
        for i, r in enumerate(rounds)
    ]
    headers = ["round", "table aim", "predicted", f"measured ({runtime}, batch {batch})", "channels", "kept"]
    return "\n" + stage.table(rows, headers)


def print_skipped(run, skip_blocks):
    """One line per block left untouched, with why."""
    for name, roles in run.blocks.items():
        if not prunable(roles) or name in skip_blocks:
            reason = (
                "in SKIP_BLOCKS" if name in skip_blocks else "no expand conv (channels tied to the stem and residual)"
            )
            print(f"  skipped {name}: {reason}")
