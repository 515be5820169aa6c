"""Activation criteria against torch-pruning's own criteria, at matched MACs, on the flower photos.

Reads:  RUN_DIR/baseline.pt and RUN_DIR/activation_stats.pt/.json (what `make flowers` writes: the baseline
        trained on DATA_DIR's train/ split, statistics captured on a stratified sample of it).
Writes: RUN_DIR/criteria_comparison.json (every result: MACs and params removed, top-1 with a 95% bootstrap
        interval and per-image correctness after each recovery step; the config and provenance),
        examples/criteria_comparison.png (top-1 against MACs removed, a line per criterion, a panel per
        allocation and recovery step) and examples/criteria_comparison.md (the tables the README includes).
Every criterion prunes the same candidates (the hidden channels of the inverted-residual blocks with an
expand conv: one torch-pruning group per block), with the same floors and ROUND_TO, to the same MACs:
ALLOCATION uniform takes the same ratio of every block (the ratio whose MACs come nearest the target, the
same per-block counts for every criterion); global ranks all blocks' channels together. test/ only scores.
Results are saved after every configuration; an interrupted run continues where it stopped.

    python -m benchmarks.compare_criteria
    python -m benchmarks.compare_criteria --TARGETS=[0.2] --FT_POINTS=[] --RANDOM_SEEDS=[0]
"""

import time

from tqdm import tqdm

from mbv3prune import bench, config, iterative, measure, plots, pruning, reconstruct, stage
from mbv3prune.activation_stats import ActivationStats
from mbv3prune.artifacts import provenance, sha256_file, write_json, write_text
from mbv3prune.compensate import folder
from mbv3prune.criterion import Criterion
from mbv3prune.data import stratified_sample
from mbv3prune.errors import PruneError
from mbv3prune.experiment import prune_copy, val_top1
from mbv3prune.selection import to_macs_target, uniform_ratio
from mbv3prune.train import seed_everything

# -----------------------------------------------------------------------------
DATA_DIR = "../shared/data/oxford-flowers12"  # the data set the baseline was trained on (train/ + test/)
RUN_DIR = "runs/flowers"  # baseline.pt and activation_stats.pt of `make flowers`
OUT = ""  # results JSON ("" = RUN_DIR/criteria_comparison.json)
FIGURE = "examples/criteria_comparison.png"  # the figure
TABLE = "examples/criteria_comparison.md"  # the Markdown tables (the README includes them)
MODEL_ARCH = "mobilenet_v3_large"  # must match the checkpoint
IMAGE_SIZE = 128  # resolution the baseline was trained and the statistics captured at
TARGETS = [0.1, 0.2, 0.3, 0.4, 0.5, 0.65]  # fractions of MACs removed
ALLOCATIONS = ["uniform", "global"]  # uniform: same ratio in every block; global: one ranking across blocks
CRITERIA = [
    "deadness",
    "deadness_class_aware",
    "deadness_iterative",
    "mean_abs",
    "contribution",
    "fluctuation",
    "obs",
    "tp_l1",
    "tp_taylor",
    "tp_bn_scale",
    "tp_activation",
    "random",
]  # criteria compared
RECONSTRUCT = ["sequential", "oneshot"]  # refits also measured (global allocation): sequential and / or oneshot
RECONSTRUCT_CRITERIA = ["obs", "contribution", "fluctuation", "tp_taylor"]  # also measured with each refit (4 best)
RIDGES = [1e-4, 1e-3, 1e-2, 1e-1]  # refit and obs ridge candidates, chosen on the val split (never on test)
RIDGE_TARGET = 0.5  # the MACs target, obs + the first RECONSTRUCT, at which the ridge is chosen
REFIT_SAMPLES_PER_CLASS = 20  # images per class of the capture's sample the sequential refit runs on
RESIDUAL_TARGET = True  # sequential: residual blocks also absorb the difference of the two models' block inputs
OUTPUT_UNITS = True  # contribution / fluctuation: weigh the project conv column by its BN's scale
RANDOM_SEEDS = [0, 1, 2]  # seeds of the random criterion
FT_POINTS = [["global", 0.3]]  # [allocation, target] pairs also fine-tuned (~2.5 min each; random: first seed only)
FINETUNE_EPOCHS = 3  # fine-tuning epochs at FT_POINTS (train_model.py's recipe, same for every criterion)
FINETUNE_LR = 5e-4  # peak learning rate of the fine-tuning
BN_BATCHES = 20  # training batches for BN recalibration
COMPENSATE = True  # fold removed channels' mean into the project BN / SE fc1 before pruning (every criterion)
MIN_KEEP_RATIO = 0.25  # every block keeps at least this fraction of its hidden channels (and at least 8)
ROUND_TO = 8  # kept hidden channels are a multiple of this
MACS_TOLERANCE = 0.01  # global allocation: MACs removed stay within target + this (a chunk that overshoots is passed)
MIN_CLASS_SAMPLES = 5  # class-aware deadness: classes with fewer sampled images do not count
ITERATIVE_SAMPLES_PER_CLASS = 10  # deadness_iterative: images per class re-measured after each block
TAYLOR_BATCHES = 4  # tp_taylor: training batches whose gradients are accumulated
ACTIVATION_IMAGES = 128  # tp_activation: training images of its one forward pass
REPRODUCE = True  # first reproduce DEVELOPERS.md's measurement (25% of every block, BN recalibrated)
REPRODUCE_THRESHOLD = 0.05  # DEVELOPERS.md's fixed deadness threshold |a| < 0.05 (read from the histograms)
BATCH_SIZE = 64  # images per batch
NUM_WORKERS = 2  # data-loading worker processes
DEVICE = "auto"  # auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps
SEED = 0  # seeds fine-tuning and data order
BN_RECALIBRATE = True  # (always on here: the BN-recalibrated step is one of the reported steps)
DEBUG = False  # show tracebacks of the project's errors
# -----------------------------------------------------------------------------
OURS = ("deadness", "deadness_class_aware", "deadness_iterative", "mean_abs", "contribution", "fluctuation", "obs")
RESULT_KEYS = (
    "DATA_DIR",
    "RUN_DIR",
    "MODEL_ARCH",
    "IMAGE_SIZE",
    "FINETUNE_EPOCHS",
    "FINETUNE_LR",
    "BN_BATCHES",
    "COMPENSATE",
    "MIN_KEEP_RATIO",
    "ROUND_TO",
    "MIN_CLASS_SAMPLES",
    "ITERATIVE_SAMPLES_PER_CLASS",
    "TAYLOR_BATCHES",
    "ACTIVATION_IMAGES",
    "BATCH_SIZE",
    "SEED",
    "REPRODUCE_THRESHOLD",
    "MACS_TOLERANCE",
    "RIDGES",
    "RIDGE_TARGET",
    "REFIT_SAMPLES_PER_CLASS",
    "RESIDUAL_TARGET",
    "OUTPUT_UNITS",
)


def check_config(cfg):
    unknown = [c for c in cfg["CRITERIA"] if c not in OURS and not c.startswith("tp_") and c != "random"]
    if unknown:
        raise PruneError(f"unknown criterion {unknown[0]!r} in CRITERIA")
    bad = [m for m in cfg["RECONSTRUCT"] if m not in ("sequential", "oneshot")]
    if bad:
        raise PruneError(f"RECONSTRUCT={cfg['RECONSTRUCT']}: use sequential and / or oneshot")
    if any(not 0 < t < 0.75 for t in cfg["TARGETS"]):
        raise PruneError(f"TARGETS={cfg['TARGETS']} must lie in (0, 0.75)")
    if any(a not in ("uniform", "global") for a in cfg["ALLOCATIONS"]):
        raise PruneError(f"ALLOCATIONS={cfg['ALLOCATIONS']}: use uniform and/or global")


def rankings(run, cfg):
    """{criterion name: ranking}; random expands to one entry per seed."""
    out = {}
    for name in cfg["CRITERIA"]:
        t0 = time.perf_counter()
        if name == "random":
            out.update({f"random_s{s}": bench.random_ranking(run, s) for s in cfg["RANDOM_SEEDS"]})
        elif name.startswith("tp_"):
            out[name] = bench.torch_pruning_ranking(run, name, cfg["TAYLOR_BATCHES"], cfg["ACTIVATION_IMAGES"])
        elif name in ("deadness", "deadness_iterative"):
            out[name] = bench.ours(run, "deadness")
        elif name == "deadness_class_aware":
            out[name] = bench.ours(run, "deadness", class_aware=True, min_class_samples=cfg["MIN_CLASS_SAMPLES"])
        elif name == "obs":
            out[name] = obs_criterion(run, cfg).rank(run.stats, run.blocks, run.layers, run.model)
        else:
            out[name] = bench.ours(run, name, output_units=cfg["OUTPUT_UNITS"])
        print(f"ranked by {name} in {time.perf_counter() - t0:.1f} s")
    return out


def select(run, cfg, ranking, allocation, target, name=""):
    """The selection of a ranking at ``target``; obs under global allocation ranks chunks by cost per MAC."""
    if allocation == "uniform":
        return bench.uniform_to_macs(ranking, run, target, cfg["MIN_KEEP_RATIO"], cfg["ROUND_TO"])[0]
    if name.split("+")[0] == "obs":
        return pruning.to_macs_target(run, obs_criterion(run, cfg), target, cfg["MACS_TOLERANCE"])[0]
    return to_macs_target(
        ranking,
        run.blocks,
        run.per_channel,
        run.total,
        target,
        cfg["MIN_KEEP_RATIO"],
        cfg["ROUND_TO"],
        cfg["MACS_TOLERANCE"],
    )[0]


def obs_criterion(run, cfg):
    return Criterion("obs", 1.0, min_keep_ratio=cfg["MIN_KEEP_RATIO"], round_to=cfg["ROUND_TO"], ridge=run.ridge)


def compensator(run, cfg, refit=None):
    """The refit (``refit``: sequential or oneshot, at the chosen ridge), else the mean compensation."""
    if refit is not None:
        batches_fn = run.refit_batches if refit == "sequential" else None
        return reconstruct.folder(refit, run.model, batches_fn, run.ridge, cfg["RESIDUAL_TARGET"])
    if not cfg["COMPENSATE"]:
        return None
    return folder(run.capture_point)


def choose_ridge(run, cfg, results, save):
    """The ridge of the best val top-1 with obs and the first refit at RIDGE_TARGET (results["ridge_choice"])."""
    refit = cfg["RECONSTRUCT"][0] if cfg["RECONSTRUCT"] else None
    if results.get("ridge_choice", {}).get("refit", refit) != refit:
        del results["ridge_choice"]  # chosen with another refit
    if "ridge_choice" not in results:
        refit, val = (cfg["RECONSTRUCT"][0] if cfg["RECONSTRUCT"] else None), {}
        for ridge in cfg["RIDGES"]:
            run.ridge = ridge
            chosen = select(run, cfg, None, "global", cfg["RIDGE_TARGET"], "obs")
            model, _ = prune_copy(
                run.model, run.blocks, chosen, cfg["IMAGE_SIZE"], run.stats, compensator(run, cfg, refit)
            )
            val[str(ridge)] = val_top1(model, run.loaders, run.class_names, run.device)
            print(f"ridge {ridge:g}: val top-1 {val[str(ridge)]:.4f} (obs + {refit}, {cfg['RIDGE_TARGET']:.0%} MACs)")
        best = max(cfg["RIDGES"], key=lambda r: (val[str(r)], -r))
        results["ridge_choice"] = {"val_top1": val, "ridge": best, "target": cfg["RIDGE_TARGET"], "refit": refit}
        save()
    run.ridge = results["ridge_choice"]["ridge"]


def iterative_model(run, cfg, quotas):
    """The baseline pruned block by block to ``quotas``, re-measuring downstream deadness after each block."""
    items = stratified_sample(
        measure.sample_items(run.stats_meta, cfg["DATA_DIR"]), cfg["ITERATIVE_SAMPLES_PER_CLASS"], seed=cfg["SEED"]
    )
    loader = stage.loader(cfg, items)
    criterion = Criterion(
        "deadness",
        ActivationStats.of(run.stats).threshold,
        deadness_threshold=0.0,
        min_keep_ratio=cfg["MIN_KEEP_RATIO"],
        round_to=cfg["ROUND_TO"],
        min_class_samples=cfg["MIN_CLASS_SAMPLES"],
    )
    schedule = iterative.Schedule(max_rounds=len(run.blocks), quotas={b: len(v) for b, v in quotas.items()})
    pruned, _, removed, _ = iterative.run_loaded(
        run, loader, criterion, schedule, compensator(run, cfg), log=lambda *_: None
    )
    return pruned, removed


def finetuned(cfg, allocation, target, name):
    """Whether this configuration is also fine-tuned: at FT_POINTS, and for random its first seed only."""
    return [allocation, target] in [list(p) for p in cfg["FT_POINTS"]] and not (
        name.startswith("random_s") and name != f"random_s{cfg['RANDOM_SEEDS'][0]}"
    )


def one_config(run, cfg, ranks, criterion, allocation, target, finetune):
    base, _, refit = criterion.partition("+")
    chosen = select(run, cfg, ranks[base], allocation, target, base)  # deadness_iterative: the deadness ranking
    step_cfg = {**cfg, "FINETUNE_EPOCHS": cfg["FINETUNE_EPOCHS"] if finetune else 0, "BN_RECALIBRATE": True}
    model = None
    if criterion == "deadness_iterative":
        model, chosen = iterative_model(run, cfg, chosen)
    return bench.prune_and_score(run, chosen, step_cfg, compensator(run, cfg, refit or None), model)


def configurations(cfg, ranks):
    """(allocation, target, name) of every configuration: each ranking, and under global allocation each
    RECONSTRUCT_CRITERIA ranking with each refit too (``name+refit``)."""
    refits = [f"{n}+{r}" for r in cfg["RECONSTRUCT"] for n in cfg["RECONSTRUCT_CRITERIA"] if n in ranks]
    return [
        (a, t, n)
        for a in cfg["ALLOCATIONS"]
        for t in cfg["TARGETS"]
        for n in list(ranks) + (refits if a == "global" else [])
    ]


def reproduce(run, cfg, ranks, results, save):
    """DEVELOPERS.md: 25% of every block's hidden channels, no compensation, BN recalibrated."""
    repro = {
        "deadness_0.05": bench.ours(run, "deadness", threshold=cfg["REPRODUCE_THRESHOLD"]),
        "mean_abs": ranks.get("mean_abs") or bench.ours(run, "mean_abs"),
        "tp_l1": ranks.get("tp_l1") or bench.torch_pruning_ranking(run, "tp_l1"),
        **{k: v for k, v in ranks.items() if k.startswith("random_s")},
    }
    for name, ranking in repro.items():
        key = f"reproduce/0.25/{name}"
        if key not in results:
            chosen = uniform_ratio(ranking, run.blocks, 0.25, cfg["MIN_KEEP_RATIO"], cfg["ROUND_TO"])
            results[key] = bench.prune_and_score(run, chosen, {**cfg, "FINETUNE_EPOCHS": 0, "BN_RECALIBRATE": True})
            save()


def main(cfg):
    t0 = time.perf_counter()
    check_config(cfg)
    seed_everything(cfg["SEED"])
    out = config.path_or_default(cfg, "OUT", "criteria_comparison.json")
    run = bench.load_run(cfg)
    identity = {"checkpoint_sha256": sha256_file(run.checkpoint), **{k: cfg[k] for k in RESULT_KEYS}}
    results, earlier = bench.resume(out, identity, "criteria comparison")
    if results:
        print(f"continuing {out}: {len(results)} results already measured")
    record = {
        "schema_version": 1,
        "kind": "mbv3prune-criteria-comparison",
        "identity": identity,
        "baseline": None,
        "results": results,
        "provenance": provenance(cfg, {"checkpoint": run.checkpoint}),
    }
    save = lambda: write_json(out, record)  # noqa: E731
    if "baseline" not in results:
        results["baseline"] = bench.with_intervals({"baseline": bench.score_baseline(run)})["baseline"]
    record["baseline"] = results["baseline"]
    run.refit_batches, run.ridge = pruning.refit_batches(run, cfg), cfg["RIDGES"][0]
    if cfg["RECONSTRUCT"] or "obs" in cfg["CRITERIA"]:
        choose_ridge(run, cfg, results, save)
    ranks = rankings(run, cfg)
    if cfg["REPRODUCE"]:
        reproduce(run, cfg, ranks, results, save)
    todo = [
        (a, t, n)
        for a, t, n in configurations(cfg, ranks)
        if "finetuned" not in results.get(f"{a}/{t}/{n}", {})
        and (f"{a}/{t}/{n}" not in results or finetuned(cfg, a, t, n))
    ]
    for allocation, target, name in tqdm(todo, desc="criteria", disable=None):
        results[f"{allocation}/{target}/{name}"] = one_config(
            run, cfg, ranks, name, allocation, target, finetuned(cfg, allocation, target, name)
        )
        save()
    record["seconds"] = round(earlier + time.perf_counter() - t0, 1)  # over every run that added results
    save()
    figure = plots.criteria_comparison(results, cfg["ALLOCATIONS"], cfg["FIGURE"])
    table = write_markdown(cfg, results)
    print(table)
    stage.finish([out, figure, cfg["TABLE"]])


# --- the Markdown tables ------------------------------------------------------------------------------

STEPS = (("pruned", "no FT"), ("bn_recalibrated", "BN"), ("finetuned", "FT"))


def _pct(r, step):
    return f"{100 * r[step]['top1']:.1f}" if step in r else ""


def criteria_in(results, allocation, target):
    prefix = f"{allocation}/{target}/"
    return {k[len(prefix) :]: v for k, v in results.items() if k.startswith(prefix)}


def verdict(rows, step, against=None):
    """win / loss / tie of our best criterion against the best other one (or the best whose name starts with
    ``against``): a win only when the 95% intervals do not overlap."""
    ours = {k: v for k, v in rows.items() if k.split("+")[0] in OURS and step in v}
    others = {
        k: v for k, v in rows.items() if k.split("+")[0] not in OURS and step in v and k.startswith(against or "")
    }
    if not ours or not others:
        return ""
    a = max(ours.items(), key=lambda kv: kv[1][step]["top1"])
    b = max(others.items(), key=lambda kv: kv[1][step]["top1"])
    if a[1][step]["ci95"][0] > b[1][step]["ci95"][1]:
        return f"win ({a[0]})"
    if b[1][step]["ci95"][0] > a[1][step]["ci95"][1]:
        return f"loss (to {b[0]})"
    return f"tie ({a[0]} vs {b[0]})"


def write_markdown(cfg, results):
    base = results["baseline"]
    lines = [
        f"Baseline top-1 {100 * base['top1']:.1f}% on {len(base['correct'])} test photos. Cells: top-1 % with "
        "no fine-tuning / after BN recalibration, at the MACs removed measured after pruning.",
        "",
    ]
    repro = {k.split("/")[-1]: v for k, v in results.items() if k.startswith("reproduce/")}
    if repro:
        lines += [
            "25% of every block's hidden channels (DEVELOPERS.md's measurement):",
            "",
            "| criterion | MACs removed | no FT | BN recalibrated (95% CI) |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {k} | {100 * v['macs_reduction']:.1f}% | {_pct(v, 'pruned')} | {bench.cell(v, 'bn_recalibrated')} |"
            for k, v in repro.items()
        ]
        lines.append("")
    for allocation in cfg["ALLOCATIONS"]:
        targets = [t for t in cfg["TARGETS"] if criteria_in(results, allocation, t)]
        names = list(dict.fromkeys(n for t in targets for n in criteria_in(results, allocation, t)))
        lines += [
            f"{allocation} allocation, top-1 % no FT / BN recalibrated:",
            "",
            "| criterion | " + " | ".join(f"{100 * t:.0f}% MACs" for t in targets) + " |",
            "|---" * (len(targets) + 1) + "|",
        ]
        for n in names:
            cells = []
            for t in targets:
                r = criteria_in(results, allocation, t).get(n)
                cells.append(f"{_pct(r, 'pruned')} / {_pct(r, 'bn_recalibrated')}" if r else "")
            lines.append(f"| {n} | " + " | ".join(cells) + " |")
        for label, against in (("best other", None), ("tp_l1", "tp_l1"), ("best random seed", "random")):
            lines.append(
                f"| best ours vs {label} (BN) | "
                + " | ".join(verdict(criteria_in(results, allocation, t), "bn_recalibrated", against) for t in targets)
                + " |"
            )
        lines.append("")
    for allocation, target in cfg["FT_POINTS"]:
        rows = criteria_in(results, allocation, target)
        if not any("finetuned" in r for r in rows.values()):
            continue
        lines += [
            f"{allocation} allocation at {100 * target:.0f}% MACs, {cfg['FINETUNE_EPOCHS']} fine-tuning epochs "
            "(95% bootstrap intervals):",
            "",
            "| criterion | MACs removed | no FT | BN recalibrated | fine-tuned |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {n} | {100 * r['macs_reduction']:.1f}% | " + " | ".join(bench.cell(r, step) for step, _ in STEPS) + " |"
            for n, r in rows.items()
            if "finetuned" in r
        ]
        lines.append(f"\nBest ours vs best other after fine-tuning: {verdict(rows, 'finetuned')}.\n")
    text = "\n".join(lines) + "\n"
    write_text(cfg["TABLE"], text)
    return text


if __name__ == "__main__":
    config.run(main, globals())
