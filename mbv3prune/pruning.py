"""The pruning stage's modes: which channels go (threshold, target_macs, target_latency, iterative), the fallback,
the sweep.

``threshold`` prunes exactly the plan's indices; when they remove less than ``MIN_USEFUL_REDUCTION`` of the
MACs and ``FALLBACK_TARGET`` is set, the most prunable channels go to that MACs target instead.
``target_macs`` ranks every prunable block's channels by the criterion and takes the most prunable ROUND_TO
chunks until the MACs fall by ``TARGET_MACS_REDUCTION``; ``target_latency`` the same per millisecond saved from
a latency table (obs, and contribution / fluctuation in output units, by their summed cost per millisecond:
``Criterion.costs``), re-aimed by timing the whole pruned model (``latency_feedback``). ``iterative`` prunes block
by block in forward order, re-measuring downstream blocks after each round (``iterative.run``). Each returns
(pruned model, {block: removed indices}, how it was chosen, extra report fields).
"""

import os

from . import distributed, iterative, latency, latency_feedback, measure, plots, reconstruct, report, selection, stage
from .compensate import folder, require_project_input
from .criterion import Criterion
from .data import Skipped, batches, stratified_sample
from .errors import PruneError
from .experiment import eval_accuracy, prune_copy, recover
from .prune import count_macs_params

PRUNE_MODES = ("threshold", "target_macs", "target_latency", "iterative")
RECONSTRUCTIONS = ("sequential", "oneshot", "none")
MIN_USEFUL_REDUCTION = 0.10  # below this a plan is reported as not worth pruning


def check_mode(cfg):
    """PruneError for an unknown PRUNE_MODE or an out-of-range target, naming the constant."""
    if cfg["PRUNE_MODE"] not in PRUNE_MODES:
        raise PruneError(f"unknown PRUNE_MODE {cfg['PRUNE_MODE']!r}: use one of {', '.join(PRUNE_MODES)}")
    for name in ("TARGET_MACS_REDUCTION", "FALLBACK_TARGET", "TARGET_LATENCY_REDUCTION"):
        if not 0 <= cfg[name] < 1:
            raise PruneError(f"{name}={cfg[name]} must lie in [0, 1)")
    if cfg["PRUNE_MODE"] == "target_latency" and (cfg["LATENCY_CALIBRATE"] < 0 or cfg["LATENCY_CHECK_REPEATS"] < 1):
        raise PruneError(
            f"LATENCY_CALIBRATE={cfg['LATENCY_CALIBRATE']} must be >= 0 and "
            f"LATENCY_CHECK_REPEATS={cfg['LATENCY_CHECK_REPEATS']} >= 1"
        )
    if cfg["RECONSTRUCT"] not in RECONSTRUCTIONS:
        raise PruneError(f"unknown RECONSTRUCT {cfg['RECONSTRUCT']!r}: use one of {', '.join(RECONSTRUCTIONS)}")
    if cfg["RECONSTRUCT"] != "none" and (cfg["CORRECT_VARIANCE"] or not cfg["COMPENSATE"]):
        raise PruneError(
            f"RECONSTRUCT={cfg['RECONSTRUCT']} refits the kept weights (mean and variance included): "
            "CORRECT_VARIANCE=True and COMPENSATE=False go with RECONSTRUCT=none only"
        )


def ranks(cfg):
    """Whether the stage ranks channels by the score itself (a plain threshold prune uses the plan's proposals)."""
    return cfg["PRUNE_MODE"] != "threshold" or bool(cfg["SWEEP"]) or bool(cfg["FALLBACK_TARGET"])


def needs_stats(cfg):
    """Whether the stage needs the activation statistics (every mode but a plain threshold prune does)."""
    return ranks(cfg) or cfg["COMPENSATE"]


def criterion(run, cfg):
    """The plan's criterion with the stage's score (when SCORE is set), floors, rounding, skipped blocks and ridge."""
    score = cfg["SCORE"] or run.plan["score"]
    if run.stats is not None:
        needs = "SCORE=obs" if score == "obs" and ranks(cfg) else None
        needs = needs or ("RECONSTRUCT=oneshot" if cfg["RECONSTRUCT"] == "oneshot" else None)
        measure.check_second_moments(run.stats, run.stats_path, needs)
    overrides = {"ridge": cfg["RIDGE"]} if "RIDGE" in cfg else {}
    if "OUTPUT_UNITS" in cfg:
        overrides["output_units"] = cfg["OUTPUT_UNITS"]
    if score != run.plan["score"] or (score == "obs" and cfg["CLASS_AWARE"]):  # the plan's class awareness is
        overrides["class_aware"] = cfg["CLASS_AWARE"]  # its own score's; obs with CLASS_AWARE: refused (Criterion)
    return Criterion.from_plan(
        run.plan,
        score=score,
        min_keep_ratio=cfg["MIN_KEEP_RATIO"],
        round_to=cfg["ROUND_TO"],
        skip_blocks=cfg["SKIP_BLOCKS"],
        **overrides,
    )


def refit_batches(run, cfg):
    """() -> the refit sample's batches on the device: REFIT_SAMPLES_PER_CLASS images per class of the capture's
    sample, decoded once and held in memory (every block's refit runs over them again)."""
    items = measure.sample_items(run.stats_meta, cfg["DATA_DIR"])
    if cfg["REFIT_SAMPLES_PER_CLASS"]:
        items = stratified_sample(items, cfg["REFIT_SAMPLES_PER_CLASS"], seed=cfg["SEED"])
    held = [images for images, _ in batches(stage.loader(cfg, items), Skipped(), "cpu")]
    return lambda: (images.to(run.device, non_blocking=True) for images in held)


def compensator(run, cfg):
    """What is folded in before every prune: the refit (RECONSTRUCT sequential or oneshot), else the mean
    compensation (None with COMPENSATE=False)."""
    if cfg["RECONSTRUCT"] == "sequential":
        if getattr(run, "refit_batches", None) is None:  # decoded once per run, however many prunes (SWEEP)
            run.refit_batches = refit_batches(run, cfg)
        return reconstruct.folder("sequential", run.model, run.refit_batches, cfg["RIDGE"], cfg["RESIDUAL_TARGET"])
    if cfg["RECONSTRUCT"] == "oneshot":
        return reconstruct.folder("oneshot", ridge=cfg["RIDGE"])
    if not cfg["COMPENSATE"]:
        return None
    require_project_input(run.capture_point)
    return folder(run.capture_point, cfg["CORRECT_VARIANCE"])


def choose(run, crit, mode, target, class_aware=False):
    """(selection, how it was chosen) for the one-shot modes."""
    if mode == "threshold":
        chosen = selection.from_plan(run.plan, run.blocks, crit.skip_blocks, crit.min_keep_ratio, crit.round_to)
        return chosen, f"the plan's indices ({run.plan['score']} > {run.plan['deadness_threshold']})"
    chosen, _ = to_macs_target(run, crit.replace(class_aware=class_aware), target)
    aware = " (class-aware)" if class_aware else ""
    return chosen, f"most prunable by {crit.score}{aware} to {target:.0%} of MACs"


def to_macs_target(run, crit, target, max_overshoot=None):
    """(selection, predicted reduction): the global ranking by ``crit`` to ``target`` of the MACs; obs ranks
    ROUND_TO chunks by their summed greedy cost per MAC saved, the other scores by prunability."""
    if crit.score == "obs":
        removals = crit.removals(run.stats, {b: r for b, r in run.blocks.items() if b in run.per_channel}, run.model)
        steps = selection.costed_steps(removals, run.blocks, run.per_channel, crit.min_keep_ratio, crit.round_to)
        return selection.to_macs_target(
            None,
            run.blocks,
            run.per_channel,
            run.total,
            target,
            crit.min_keep_ratio,
            crit.round_to,
            max_overshoot,
            steps=steps,
        )
    ranking = crit.rank(run.stats, run.blocks, run.layers, run.model)
    return selection.to_macs_target(
        ranking, run.blocks, run.per_channel, run.total, target, crit.min_keep_ratio, crit.round_to, max_overshoot
    )


def latency_spec(run, cfg, crit):
    """The latency table's spec: this device, LATENCY_RUNTIME, LATENCY_BATCH, IMAGE_SIZE, the selection's grid."""
    return latency.TableSpec(
        str(run.device),
        cfg["LATENCY_RUNTIME"],
        cfg["LATENCY_BATCH"],
        cfg["IMAGE_SIZE"],
        crit.min_keep_ratio,
        crit.round_to,
        cfg["LATENCY_REPEATS"],
    )


def to_latency_target(run, cfg, crit, target):
    """(selection, extra report): the global ranking by ``crit`` per millisecond saved, from the per-block
    latency table (measured once in LATENCY_RUNTIME on this device, cached in RUN_DIR), re-aimed until the
    whole pruned model, timed in that runtime, saves ``target`` (LATENCY_CALIBRATE rounds, latency_feedback)."""
    spec = latency_spec(run, cfg, crit)
    blocks = {b: r for b, r in run.blocks.items() if b in run.per_channel and b not in crit.skip_blocks}
    path = os.path.join(cfg["RUN_DIR"], f"latency_table_{cfg['LATENCY_RUNTIME']}.json")
    table, reused = latency.load_or_build(path, run.model, blocks, spec)
    print(f"{'re-using' if reused else 'measured'} the latency table {path}")
    if crit.score == "obs":
        removals = crit.removals(run.stats, blocks, run.model)
        ranking, kind = {b: [(cost, c) for c, cost in r] for b, r in removals.items()}, "removal"
    elif crit.output_costs():  # contribution / fluctuation in output units: costs, ranked per ms like obs's
        ranking, kind = crit.costs(run.stats, blocks, run.layers, run.model), "cost"
    else:
        ranking, kind = crit.rank(run.stats, blocks, run.layers, run.model), "prunability"

    def plan_at(aim):
        return latency.to_latency_target(ranking, run.blocks, table, aim, crit.min_keep_ratio, crit.round_to, kind)

    if not cfg["LATENCY_CALIBRATE"]:
        chosen, predicted = plan_at(target)
        return chosen, {"latency_ranking": kind, "predicted_latency_reduction": round(predicted, 6)}
    with latency_feedback.WholeModel(run.model, run.blocks, spec, cfg["LATENCY_CHECK_REPEATS"]) as measure:
        chosen, best, rounds = latency_feedback.calibrate(plan_at, measure, target, cfg["LATENCY_CALIBRATE"])
    print(report.calibration_table(rounds, best, cfg["LATENCY_RUNTIME"], cfg["LATENCY_BATCH"]))
    return chosen, {
        "latency_ranking": kind,
        "predicted_latency_reduction": rounds[best]["predicted"],
        "measured_latency_reduction": rounds[best]["measured"],
        "latency_calibration": rounds,
    }


def predicted_reduction(run, chosen):
    """MACs reduction of a selection (hidden-channel MACs are linear in the width)."""
    return sum(len(v) * run.per_channel[b] for b, v in chosen.items()) / run.total


def prune_one_shot(run, cfg, crit):
    """Threshold or target_macs: (pruned model, selection, how, extra report)."""
    mode, target = cfg["PRUNE_MODE"], cfg["TARGET_MACS_REDUCTION"]
    if mode != "target_latency":
        chosen, how = choose(run, crit, mode, target, cfg["CLASS_AWARE"])
        extra = {"target_macs_reduction": target if mode == "target_macs" else None}
    else:
        chosen, measured = distributed.from_main(
            lambda: to_latency_target(run, cfg, crit, cfg["TARGET_LATENCY_REDUCTION"])
        )
        by = (
            f"most prunable by {crit.score}, chunks timed by the latency table"
            if measured["latency_ranking"] == "prunability"
            else f"cheapest by {crit.score} per ms saved"
        )
        how = f"{by} to {cfg['TARGET_LATENCY_REDUCTION']:.0%} of latency"
        extra = {
            "target_latency_reduction": cfg["TARGET_LATENCY_REDUCTION"],
            "latency_runtime": cfg["LATENCY_RUNTIME"],
            "latency_batch": cfg["LATENCY_BATCH"],
            **measured,
        }
    if mode == "threshold" and predicted_reduction(run, chosen) < MIN_USEFUL_REDUCTION:
        print(
            f"the plan removes only {100 * predicted_reduction(run, chosen):.1f}% of MACs "
            f"(< {100 * MIN_USEFUL_REDUCTION:.0f}%): few channels are dead at its thresholds"
        )
        if cfg["FALLBACK_TARGET"]:
            mode, target = "target_macs", cfg["FALLBACK_TARGET"]
            print(
                f"FALLBACK_TARGET={target}: pruning the most prunable channels to {100 * target:.0f}% of MACs instead"
            )
            chosen, how = choose(run, crit, mode, target, cfg["CLASS_AWARE"])
            extra = {"target_macs_reduction": target, "fallback": "plan removed < 10% of MACs"}
    pruned, _ = prune_copy(run.model, run.blocks, chosen, cfg["IMAGE_SIZE"], run.stats, compensator(run, cfg))
    return pruned, chosen, how, {"mode": mode, **extra}


def prune_iteratively(run, cfg, crit):
    """Iterative mode: (pruned model, selection, how, extra report with the per-round log)."""
    sample_loader = stage.loader(cfg, measure.sample_items(run.stats_meta, cfg["DATA_DIR"]))
    schedule = iterative.Schedule(cfg["BLOCKS_PER_ROUND"], cfg["MAX_ROUNDS"], cfg["TARGET_MACS_REDUCTION"])
    pruned, rounds, chosen, measured = iterative.run_loaded(
        run,
        sample_loader,
        crit,
        schedule,
        compensator(run, cfg),
        second_moments=crit.score == "obs" or cfg["RECONSTRUCT"] == "oneshot",
        score_fn=lambda m: eval_accuracy(m, run.loaders, run.class_names, run.device, "round")["top1"],
    )
    figures = (
        []
        if not distributed.is_main()
        else [
            plots.deadness_rounds(
                measured["initial_values"],
                measured["latest_values"],
                crit.deadness_threshold if crit.score == "deadness" else crit.threshold,
                os.path.join(cfg["RUN_DIR"], "deadness_rounds.png"),
                crit.score,
            )
        ]
    )
    how = f"iterative: consistently {crit.cut()}, {len(rounds)} rounds"
    return (
        pruned,
        chosen,
        how,
        {
            "mode": "iterative",
            "rounds": rounds,
            "figures": figures,
            "target_macs_reduction": cfg["TARGET_MACS_REDUCTION"] or None,
        },
    )


def prune(run, cfg, crit):
    """The stage's mode: (pruned model, selection, how, extra report)."""
    return (prune_iteratively if cfg["PRUNE_MODE"] == "iterative" else prune_one_shot)(run, cfg, crit)


def sweep(run, cfg, crit):
    """Prune, recalibrate and score at every SWEEP value; returns (points, figure path)."""
    points, sweep_cfg = [], {**cfg, "FINETUNE_EPOCHS": 0, "BN_RECALIBRATE": True}
    for value in cfg["SWEEP"]:
        if cfg["PRUNE_MODE"] == "target_macs":
            chosen, _ = choose(run, crit, "target_macs", value, cfg["CLASS_AWARE"])
        else:
            cut = {"deadness_threshold": value} if run.plan["score"] == "deadness" else {"threshold": value}
            swept = crit.replace(score=run.plan["score"], **cut)  # SCORE ranks target_macs only
            proposals = swept.propose(run.stats, run.blocks, run.layers, run.model)
            chosen = {b: p["prune"] for b, p in proposals.items() if p["prune"]}
        pruned, _ = prune_copy(run.model, run.blocks, chosen, cfg["IMAGE_SIZE"], run.stats, compensator(run, cfg))
        steps = recover(pruned, run.loaders, run.class_names, run.device, sweep_cfg)
        macs, _ = count_macs_params(pruned, cfg["IMAGE_SIZE"])
        points.append(
            {
                "value": value,
                "macs_reduction": round(1 - macs / run.total, 6),
                "top1_pruned": steps["pruned"]["top1"],
                "top1_bn_recalibrated": steps["bn_recalibrated"]["top1"],
            }
        )
        print(
            f"sweep {value}: MACs -{100 * points[-1]['macs_reduction']:.1f}%, top-1 "
            f"{points[-1]['top1_bn_recalibrated']:.4f} after BN recalibration"
        )
    xlabel = (
        "TARGET_MACS_REDUCTION"
        if cfg["PRUNE_MODE"] == "target_macs"
        else "DEADNESS_THRESHOLD"
        if run.plan["score"] == "deadness"
        else "THRESHOLD"
    )
    figure = plots.sweep(
        [p["value"] for p in points],
        [p["top1_bn_recalibrated"] for p in points],
        [p["macs_reduction"] for p in points],
        xlabel,
        os.path.join(cfg["RUN_DIR"], "pruning_sweep.png"),
    )
    return points, figure
