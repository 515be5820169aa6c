"""Broad to narrow: do the channels a model learned for a broad task go dead on a narrow one, and which criterion
prunes such a model best? The setting deadness pruning was proposed for (ImageNet weights fine-tuned on a few
species), built from the 12 flower species through the code path a user with pretrained weights runs.

Reads:  DATA_DIR (the flower photos: train/ and test/ per species).
Writes: RUN_DIR/data/broad.csv, narrow.csv (views of DATA_DIR: image paths, labels and splits; no image copied),
        RUN_DIR/broad/ (train_model.py on the BROAD species: every species not in NARROW_SPECIES),
        RUN_DIR/narrow_transfer/ (fine-tuned from the broad checkpoint on NARROW_SPECIES with the transfer recipe:
        FREEZE_BACKBONE_EPOCHS head-only epochs, backbone at BACKBONE_LR_SCALE x LR),
        RUN_DIR/narrow_scratch/ (trained from random init on the same species, for comparison),
        each narrow one with its activation statistics (THRESHOLD) and criteria_comparison.json
        (benchmarks/compare_criteria.py: CRITERIA at TARGETS of MACs, global allocation, no recovery, BN
        recalibrated, fine-tuned at FT_TARGET only); RUN_DIR/broad_all_species/ (the broad model's statistics
        over all 12 species); RUN_DIR/transfer.json (every number below with per-image correctness),
        TABLE (examples/transfer.md) and FIGURE (examples/transfer_species.png).
Reported per narrow model: the channels dead at THRESHOLD / DEADNESS_THRESHOLD, the MACs removing exactly them
saves (floors kept) and the top-1 after; the criteria at matched MACs with paired bootstrap intervals of the
differences on the same test photos ("tie" when the interval holds 0). Per channel dead in the fine-tuned
model: the species it served in the broad model (highest fraction of |a| >= THRESHOLD), against the same for
the channels that stay alive. Every step re-uses what an earlier run left when it fits (train_model.py's
REUSE, saved statistics, compare_criteria's resume): an interrupted run continues where it stopped.

Budget (Large, 128 px, 2 CPU cores, ~50 ms per training image and epoch as `make flowers` measures): broad
432 images x 24 epochs ~9 min, fine-tune 216 x 12 (3 head-only, cheaper) ~2 min, scratch 216 x 24 ~4.5 min,
captures < 1 min, two criteria comparisons (7 criteria x 3 targets, 2 fine-tuning epochs at 30%) ~5-6 min each:
about 30 minutes estimated, 20 min 9 s measured (2026-12-02, 2-core CPU; nothing of `make flowers` is re-used:
its baseline saw all 12 species).

    python -m benchmarks.transfer
"""

import os
import time

import numpy as np
import torch

import train_model
import visualize_neuron_activations
from benchmarks import compare_criteria
from mbv3prune import bench, config, measure, models, stage
from mbv3prune.activation_stats import ActivationStats, deadness_from_hist
from mbv3prune.artifacts import provenance, read_json, save_figure, sha256_file, write_json, write_text
from mbv3prune.blocks import find_blocks
from mbv3prune.capture import DEFAULT_THRESHOLD
from mbv3prune.criterion import Criterion, proposal_map
from mbv3prune.data import discover
from mbv3prune.errors import PruneError
from mbv3prune.evaluate import bootstrap_interval
from mbv3prune.train import seed_everything

# -----------------------------------------------------------------------------
DATA_DIR = "../shared/data/oxford-flowers12"  # the 12 species (train/ + test/); its val is carved from train/
RUN_DIR = "runs/transfer"  # where the views, the three models and every result go
TABLE = "examples/transfer.md"  # the Markdown tables
FIGURE = "examples/transfer_species.png"  # which species the channels dead in the narrow model served
NARROW_SPECIES = ["bluebell", "dandelion", "fritillary", "windflower"]  # the narrow task; broad: all the others
MODEL_ARCH = "mobilenet_v3_large"  # mobilenet_v3_large or mobilenet_v3_small
IMAGE_SIZE = 128  # training, capture and evaluation resolution
EPOCHS_BROAD = 24  # epochs of the broad model (train_model.py's recipe, as `make flowers`)
EPOCHS_NARROW = 12  # epochs of the fine-tuning on the narrow species, head-only ones included
EPOCHS_SCRATCH = 24  # epochs of the narrow model trained from random init
FREEZE_BACKBONE_EPOCHS = 3  # transfer recipe: head-only epochs first
BACKBONE_LR_SCALE = 0.1  # transfer recipe: the backbone learns at LR x this
LR = 2e-3  # peak learning rate of all three trainings
SAMPLES_PER_CLASS = 60  # images per species captured (60: every training image)
THRESHOLD = DEFAULT_THRESHOLD  # |a| below this counts as inactive (the capture stage's default, 2**-7)
DEADNESS_THRESHOLD = 0.9  # a channel inactive on more than this fraction of its activations is dead (the default)
TARGETS = [0.1, 0.3, 0.5]  # fractions of MACs removed at which the criteria are compared
CRITERIA = [
    "deadness",
    "deadness_iterative",
    "mean_abs",
    "fluctuation",
    "contribution",
    "obs",
    "tp_taylor",
    "tp_bn_scale",
]  # ours and the best torch-pruning criteria of examples/criteria_comparison.md
RECONSTRUCT = ["sequential"]  # the refits also measured (of obs and Taylor)
RESIDUAL_TARGET = True  # sequential: residual blocks also absorb the difference of the two models' block inputs
OUTPUT_UNITS = True  # contribution / fluctuation: weigh the project conv column by its BN's scale
FT_TARGET = 0.3  # the one target also fine-tuned
FINETUNE_EPOCHS = 2  # fine-tuning epochs at FT_TARGET (same for every criterion)
FINETUNE_LR = 5e-4  # peak learning rate of that fine-tuning
BN_BATCHES = 20  # training batches for BN recalibration
MIN_KEEP_RATIO = 0.25  # every block keeps at least this fraction of its hidden channels (and at least 8)
ROUND_TO = 8  # criteria comparison: kept hidden channels are a multiple of this (dead-channel removal: exact)
ITERATIVE_SAMPLES_PER_CLASS = 10  # deadness_iterative: images per class re-measured after each block
TAYLOR_BATCHES = 4  # tp_taylor: training batches whose gradients are accumulated
BATCH_SIZE = 64  # images per batch
NUM_WORKERS = 2  # data-loading worker processes
DEVICE = "auto"  # auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps
SEED = 0  # seeds the val split, weights, augmentation, samples and bootstrap
DEBUG = False  # show tracebacks of the project's errors
# -----------------------------------------------------------------------------
SHARED = ("MODEL_ARCH", "IMAGE_SIZE", "BATCH_SIZE", "NUM_WORKERS", "DEVICE", "SEED")  # passed to every step
MODELS = ("narrow_transfer", "narrow_scratch")
STEPS = (("pruned", "no FT"), ("bn_recalibrated", "BN"), ("finetuned", "FT"))


def check_config(cfg, class_names):
    unknown = [s for s in cfg["NARROW_SPECIES"] if s not in class_names]
    if unknown:
        raise PruneError(
            f"NARROW_SPECIES names {unknown[0]!r}, not a class of {cfg['DATA_DIR']}: "
            f"use some of {', '.join(class_names)}"
        )
    if len(set(cfg["NARROW_SPECIES"])) < 2 or len(class_names) - len(set(cfg["NARROW_SPECIES"])) < 2:
        raise PruneError(f"NARROW_SPECIES={cfg['NARROW_SPECIES']} must leave at least 2 species on each side")
    if cfg["FT_TARGET"] not in cfg["TARGETS"]:
        raise PruneError(f"FT_TARGET={cfg['FT_TARGET']} must be one of TARGETS={cfg['TARGETS']}")


def script_config(module, **overrides):
    """A script's resolved config: its constants, with ``overrides`` (a name it does not have is refused)."""
    namespace = vars(module)
    names = config.constant_names(namespace)
    unknown = sorted(set(overrides) - set(names))
    if unknown:
        raise PruneError(f"{module.__name__} has no constant {unknown[0]}")
    return {**{k: namespace[k] for k in names}, **overrides}


def shared(cfg):
    return {k: cfg[k] for k in SHARED}


# --- the data views ---------------------------------------------------------------------------------------


def write_view(path, splits, class_names, species):
    """A path,label,split CSV of the images of ``species`` (paths relative to the CSV): no image copied."""
    base = os.path.dirname(os.path.abspath(path))
    rows = ["path,label,split"]
    for split in sorted(splits):
        rows += [
            f"{os.path.relpath(os.path.abspath(p), base)},{class_names[y]},{split}"
            for p, y in splits[split]
            if class_names[y] in species
        ]
    return write_text(path, "\n".join(rows) + "\n")


def write_views(cfg, splits, class_names):
    """{"broad": CSV, "narrow": CSV} under RUN_DIR/data: DATA_DIR's train / val / test, split by species."""
    narrow = sorted(cfg["NARROW_SPECIES"])
    broad = [c for c in class_names if c not in narrow]
    folder = os.path.join(cfg["RUN_DIR"], "data")
    return (
        {
            "broad": write_view(os.path.join(folder, "broad.csv"), splits, class_names, broad),
            "narrow": write_view(os.path.join(folder, "narrow.csv"), splits, class_names, narrow),
        },
        broad,
        narrow,
    )


# --- the three models ---------------------------------------------------------------------------------------


def train(cfg, name, data_dir, epochs, checkpoint=""):
    """RUN_DIR/name/baseline.pt from train_model.py (re-used when its config, data and start are unchanged)."""
    transfer = (
        {"FREEZE_BACKBONE_EPOCHS": cfg["FREEZE_BACKBONE_EPOCHS"], "BACKBONE_LR_SCALE": cfg["BACKBONE_LR_SCALE"]}
        if checkpoint
        else {}
    )
    run_dir = os.path.join(cfg["RUN_DIR"], name)
    train_model.main(
        script_config(
            train_model,
            **shared(cfg),
            DATA_DIR=data_dir,
            RUN_DIR=run_dir,
            EPOCHS=epochs,
            LR=cfg["LR"],
            BN_BATCHES=cfg["BN_BATCHES"],
            CHECKPOINT=checkpoint,
            **transfer,
        )
    )
    return os.path.join(run_dir, "baseline.pt")


def capture(cfg, run_dir, data_dir, checkpoint):
    """(stats, stats JSON, class names) of ``checkpoint`` over DATA_DIR ``data_dir``'s training sample, saved in
    ``run_dir`` (the capture stage's functions; re-used when they fit)."""
    ccfg = script_config(
        visualize_neuron_activations,
        **shared(cfg),
        DATA_DIR=data_dir,
        RUN_DIR=run_dir,
        CHECKPOINT=checkpoint,
        SAMPLES_PER_CLASS=cfg["SAMPLES_PER_CLASS"],
        THRESHOLD=cfg["THRESHOLD"],
        DEADNESS_THRESHOLD=cfg["DEADNESS_THRESHOLD"],
        SECOND_MOMENTS=True,
        HIST_POSITIONS_PER_IMAGE=0,  # per-species deadness and activity: exact counts, not a 4-position sample
    )
    device = models.pick_device(cfg["DEVICE"])
    model, _ = models.load_checkpoint(checkpoint, cfg["MODEL_ARCH"])
    splits, class_names = stage.prepare_data(ccfg)
    stats, meta, _ = measure.ensure_stats(
        ccfg,
        models.to_device(model, device),
        find_blocks(model),
        splits,
        class_names,
        checkpoint,
        models.layer_widths(model),
        device,
    )
    return stats, meta, class_names


def comparison_config(cfg, name, data_dir):
    run_dir = os.path.join(cfg["RUN_DIR"], name)
    return script_config(
        compare_criteria,
        **shared(cfg),
        DATA_DIR=data_dir,
        RUN_DIR=run_dir,
        OUT="",
        FIGURE=os.path.join(run_dir, "criteria_comparison.png"),
        TABLE=os.path.join(run_dir, "criteria_comparison.md"),
        TARGETS=list(cfg["TARGETS"]),
        ALLOCATIONS=["global"],
        CRITERIA=list(cfg["CRITERIA"]),
        FT_POINTS=[["global", cfg["FT_TARGET"]]],
        FINETUNE_EPOCHS=cfg["FINETUNE_EPOCHS"],
        FINETUNE_LR=cfg["FINETUNE_LR"],
        BN_BATCHES=cfg["BN_BATCHES"],
        MIN_KEEP_RATIO=cfg["MIN_KEEP_RATIO"],
        ROUND_TO=cfg["ROUND_TO"],
        ITERATIVE_SAMPLES_PER_CLASS=cfg["ITERATIVE_SAMPLES_PER_CLASS"],
        TAYLOR_BATCHES=cfg["TAYLOR_BATCHES"],
        REPRODUCE=False,
        RECONSTRUCT=list(cfg["RECONSTRUCT"]),
        RECONSTRUCT_CRITERIA=["obs", "tp_taylor"],  # as examples/transfer.md was measured (within the 45 min)
        RESIDUAL_TARGET=cfg["RESIDUAL_TARGET"],
        OUTPUT_UNITS=cfg["OUTPUT_UNITS"],
    )


# --- dead channels ------------------------------------------------------------------------------------------


def dead_mask(hist, edges, cfg):
    """Channels whose fraction of |a| < THRESHOLD exceeds DEADNESS_THRESHOLD, from histograms [C, NB]."""
    return deadness_from_hist(hist, edges, cfg["THRESHOLD"]) > cfg["DEADNESS_THRESHOLD"]


def dead_channels(run, cfg):
    """{block: dead hidden channel indices} of a loaded run's statistics, every prunable block (no floors)."""
    layers, dead = proposal_map(run.layers), Criterion("deadness", cfg["THRESHOLD"], cfg["DEADNESS_THRESHOLD"])
    return {
        b: torch.nonzero(dead.candidates(run.stats, run.blocks[b], layers[b])[1]).flatten().tolist()
        for b in bench.prunable_blocks(run)
    }


def remove_dead(run, ccfg, cfg):
    """The record of removing exactly the dead channels (block floors kept, no rounding): counts, MACs, top-1."""
    dead = dead_channels(run, cfg)
    exact = Criterion("deadness", cfg["THRESHOLD"], cfg["DEADNESS_THRESHOLD"], cfg["MIN_KEEP_RATIO"], round_to=1)
    proposals = exact.propose(run.stats, run.blocks, run.layers)
    chosen = {b: e["prune"] for b, e in proposals.items() if e["prune"] and b in run.per_channel}
    record = bench.prune_and_score(
        run, chosen, {**ccfg, "FINETUNE_EPOCHS": 0, "BN_RECALIBRATE": True}, compare_criteria.compensator(run, ccfg)
    )
    return {
        "dead_channels": sum(map(len, dead.values())),
        "removed_channels": sum(map(len, chosen.values())),
        "prunable_channels": sum(run.blocks[b]["hidden_channels"] for b in dead),
        "dead_per_block": {b: len(v) for b, v in dead.items() if v},
        **record,
    }


# --- paired comparisons -------------------------------------------------------------------------------------


def paired(a, b, seed=0):
    """Top-1 of ``a`` minus ``b`` on the same images, a paired bootstrap 95% interval and the verdict."""
    diff = np.subtract(a["correct"], b["correct"], dtype=np.float64)
    lo, hi = bootstrap_interval(diff, seed=seed)
    verdict = "better" if lo > 0 else "worse" if hi < 0 else "tie"
    return {"diff": round(float(diff.mean()), 6), "ci95": [lo, hi], "verdict": verdict}


def criteria_at(results, target):
    prefix = f"global/{target}/"
    return {k[len(prefix) :]: v for k, v in results.items() if k.startswith(prefix)}


def contests(results, cfg):
    """Per target and step: the best criterion and its paired difference to every other one."""
    out = {}
    for target in cfg["TARGETS"]:
        rows = criteria_at(results, target)
        for step, _ in STEPS:
            have = {n: r[step] for n, r in rows.items() if step in r}
            if len(have) < 2:
                continue
            best = max(have, key=lambda n: have[n]["top1"])  # a tie goes to the first in CRITERIA
            out[f"{target}/{step}"] = {
                "best": best,
                "against": {n: paired(have[best], have[n], cfg["SEED"]) for n in have if n != best},
            }
    return out


# --- which species the dead channels served -----------------------------------------------------------------


def activity_by_species(stats, layer, edges, cfg):
    """[K, C]: per species, each channel's fraction of |a| >= THRESHOLD."""
    return 1 - deadness_from_hist(ActivationStats.of(stats).class_hist(layer), edges, cfg["THRESHOLD"])


def served_species(broad_stats, broad_meta, species, narrow_run, cfg, broad_species):
    """For the channels dead and alive in the fine-tuned narrow model: which species each served in the broad
    model (highest activity; "none" when dead for every species there too), counted, and the mean activity on
    the broad and the narrow species."""
    edges, dead = ActivationStats.of(broad_stats).edges, dead_channels(narrow_run, cfg)
    layers = proposal_map(broad_meta["layers"])
    is_broad = torch.tensor([s in broad_species for s in species])
    tally = {
        kind: {
            "channels": 0,
            "top_species": {s: 0 for s in [*species, "none"]},
            "activity_broad": [],
            "activity_narrow": [],
        }
        for kind in ("dead", "alive")
    }
    for block, idxs in dead.items():
        act = activity_by_species(broad_stats, layers[block], edges, cfg)
        mask = torch.zeros(act.shape[1], dtype=torch.bool)
        mask[idxs] = True
        for kind, sel in (("dead", mask), ("alive", ~mask)):
            a = act[:, sel]
            top = a.argmax(0)
            quiet = a.amax(0) <= 1 - cfg["DEADNESS_THRESHOLD"]
            t = tally[kind]
            t["channels"] += int(sel.sum())
            for k, q in zip(top.tolist(), quiet.tolist()):
                t["top_species"]["none" if q else species[k]] += 1
            t["activity_broad"] += a[is_broad].mean(0).tolist()
            t["activity_narrow"] += a[~is_broad].mean(0).tolist()
    for t in tally.values():
        served = {s: n for s, n in t["top_species"].items() if s != "none"}
        t["served_by_broad"] = round(
            sum(n for s, n in served.items() if s in broad_species) / max(1, sum(served.values())), 6
        )
        t["activity_broad"] = round(float(np.mean(t["activity_broad"])), 6) if t["activity_broad"] else None
        t["activity_narrow"] = round(float(np.mean(t["activity_narrow"])), 6) if t["activity_narrow"] else None
    return {"broad_share_by_chance": round(len(broad_species) / len(species), 6), **tally}


def broad_dead_counts(broad_stats, broad_meta, species, broad_species, blocks, cfg):
    """Channels of the broad model dead over its own species, and over the narrow species (before fine-tuning)."""
    edges, layers = ActivationStats.of(broad_stats).edges, proposal_map(broad_meta["layers"])
    is_broad = torch.tensor([s in broad_species for s in species])
    counts = {"on_broad_species": 0, "on_narrow_species": 0}
    for block in blocks:
        hist = ActivationStats.of(broad_stats).class_hist(layers[block])
        counts["on_broad_species"] += int(dead_mask(hist[is_broad].sum(0), edges, cfg).sum())
        counts["on_narrow_species"] += int(dead_mask(hist[~is_broad].sum(0), edges, cfg).sum())
    return counts


def species_figure(served, broad_species, path):
    """Bars per species: the share of the narrow model's dead channels, and of its alive ones, it served most."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(served["dead"]["top_species"])
    fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(names)), 4))
    x = np.arange(len(names))
    for offset, kind, color in ((-0.2, "dead", "tab:red"), (0.2, "alive", "tab:grey")):
        t = served[kind]
        share = [100 * t["top_species"][n] / max(1, t["channels"]) for n in names]
        ax.bar(x + offset, share, 0.4, color=color, label=f"{kind} in the fine-tuned narrow model ({t['channels']} ch)")
    labels = [f"{n}\n(broad)" if n in broad_species else "none\n(dead in broad)" if n == "none" else n for n in names]
    ax.set_xticks(x, labels, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("channels whose most active species it is (%)")
    ax.set_title("Species the fine-tuned model's channels served in the broad model", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return save_figure(fig, path)


# --- the whole run ------------------------------------------------------------------------------------------


def evaluate_narrow(cfg, name, views, results, save):
    """Capture, compare the criteria and remove the dead channels of one narrow model; returns its loaded run."""
    checkpoint = os.path.join(cfg["RUN_DIR"], name, "baseline.pt")
    capture(cfg, os.path.join(cfg["RUN_DIR"], name), views["narrow"], checkpoint)
    ccfg = comparison_config(cfg, name, views["narrow"])
    compare_criteria.main(ccfg)
    run = bench.load_run(ccfg)
    key = f"{name}/dead_removed"
    if results.get(key, {}).get("checkpoint_sha256") != sha256_file(checkpoint):
        results[key] = {"checkpoint_sha256": sha256_file(checkpoint), **remove_dead(run, ccfg, cfg)}
        save()
    return run, ccfg


def main(cfg):
    t0 = time.perf_counter()
    seed_everything(cfg["SEED"])
    splits, species = discover(cfg["DATA_DIR"], seed=cfg["SEED"])
    check_config(cfg, species)
    views, broad_species, narrow_species = write_views(cfg, splits, species)
    out = os.path.join(cfg["RUN_DIR"], "transfer.json")
    identity = {
        k: v for k, v in cfg.items() if k not in ("RUN_DIR", "TABLE", "FIGURE", "NUM_WORKERS", "DEVICE", "DEBUG")
    }
    results, earlier = bench.resume(out, identity, "transfer benchmark")
    record = {
        "schema_version": 1,
        "kind": "mbv3prune-transfer",
        "identity": identity,
        "split": {"broad": broad_species, "narrow": narrow_species},
        "results": results,
    }
    save = lambda: write_json(out, record)  # noqa: E731
    broad = train(cfg, "broad", views["broad"], cfg["EPOCHS_BROAD"])
    train(cfg, "narrow_transfer", views["narrow"], cfg["EPOCHS_NARROW"], checkpoint=broad)
    train(cfg, "narrow_scratch", views["narrow"], cfg["EPOCHS_SCRATCH"])
    runs = {name: evaluate_narrow(cfg, name, views, results, save) for name in MODELS}
    comparisons = {
        name: read_json(os.path.join(ccfg["RUN_DIR"], "criteria_comparison.json"))["results"]
        for name, (_, ccfg) in runs.items()
    }
    broad_stats, broad_meta, _ = capture(cfg, os.path.join(cfg["RUN_DIR"], "broad_all_species"), cfg["DATA_DIR"], broad)
    transfer_run = runs["narrow_transfer"][0]
    summary = {
        "baselines": {name: c["baseline"] for name, c in comparisons.items()},
        "transfer_minus_scratch": paired(
            comparisons["narrow_transfer"]["baseline"], comparisons["narrow_scratch"]["baseline"], cfg["SEED"]
        ),
        "broad_dead": broad_dead_counts(
            broad_stats, broad_meta, species, broad_species, list(transfer_run.per_channel), cfg
        ),
        "contests": {name: contests(c, cfg) for name, c in comparisons.items()},
        "served": served_species(broad_stats, broad_meta, species, transfer_run, cfg, broad_species),
        "criteria": comparisons,
    }
    record.update(
        summary,
        seconds=round(earlier + time.perf_counter() - t0, 1),
        provenance=provenance(
            cfg, {"broad": broad, **{n: os.path.join(cfg["RUN_DIR"], n, "baseline.pt") for n in MODELS}}
        ),
    )
    save()
    figure = species_figure(summary["served"], broad_species, cfg["FIGURE"])
    text = markdown(cfg, record)
    print(text)
    stage.finish([out, figure, cfg["TABLE"]])


# --- the Markdown tables ------------------------------------------------------------------------------------


def _pct(x):
    return f"{100 * x:.1f}"


def _diff(p):
    return f"{100 * p['diff']:+.1f} [{100 * p['ci95'][0]:+.0f}, {100 * p['ci95'][1]:+.0f}] {p['verdict']}"


def markdown(cfg, record):
    res, split = record["results"], record["split"]
    lines = [
        f"Broad species ({len(split['broad'])}): {', '.join(split['broad'])}. Narrow species "
        f"({len(split['narrow'])}): {', '.join(split['narrow'])}. {cfg['MODEL_ARCH']} at {cfg['IMAGE_SIZE']} px; "
        f"fine-tuned {cfg['EPOCHS_NARROW']} epochs from the broad model "
        f"({cfg['FREEZE_BACKBONE_EPOCHS']} head-only, "
        f"backbone LR x {cfg['BACKBONE_LR_SCALE']}), scratch {cfg['EPOCHS_SCRATCH']} epochs. Dead: more than "
        f"{cfg['DEADNESS_THRESHOLD']} of |a| < {cfg['THRESHOLD']:.4g}. Top-1 % on the "
        f"{len(record['baselines']['narrow_transfer']['correct'])} narrow test photos with 95% bootstrap "
        "intervals; differences are paired (same photos).",
        "",
        f"Transfer minus scratch baseline top-1: {_diff(record['transfer_minus_scratch'])}. The broad model has "
        f"{record['broad_dead']['on_broad_species']} dead hidden channels on its own species and "
        f"{record['broad_dead']['on_narrow_species']} on the narrow species (before fine-tuning).",
        "",
        "| model | baseline | dead channels (of prunable) | removed (floors) | MACs saved | no FT | BN recalibrated |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in MODELS:
        d = res[f"{name}/dead_removed"]
        lines.append(
            f"| {name} | {bench.cell({'b': record['baselines'][name]}, 'b')} | {d['dead_channels']} of "
            f"{d['prunable_channels']} | {d['removed_channels']} | {_pct(d['macs_reduction'])}% | "
            f"{bench.cell(d, 'pruned')} | {bench.cell(d, 'bn_recalibrated')} |"
        )
    for name in MODELS:
        rows, contest = record["criteria"][name], record["contests"][name]
        lines += [
            "",
            f"{name}: top-1 % no FT / BN recalibrated (fine-tuned at {100 * cfg['FT_TARGET']:.0f}%), global "
            "allocation:",
            "",
            "| criterion | " + " | ".join(f"{100 * t:.0f}% MACs" for t in cfg["TARGETS"]) + " |",
            "|---" * (len(cfg["TARGETS"]) + 1) + "|",
        ]
        for crit in dict.fromkeys(n for t in cfg["TARGETS"] for n in criteria_at(rows, t)):
            cells = []
            for t in cfg["TARGETS"]:
                r = criteria_at(rows, t).get(crit, {})
                cells.append(" / ".join(_pct(r[s]["top1"]) for s, _ in STEPS if s in r))
            lines.append(f"| {crit} | " + " | ".join(cells) + " |")
        lines += ["", "| target, step | best | best minus each other (paired 95% CI) |", "|---|---|---|"]
        for key, c in contest.items():
            target, step = key.split("/")
            lines.append(
                f"| {100 * float(target):.0f}% {dict(STEPS)[step]} | {c['best']} | "
                + "; ".join(f"{n} {_diff(p)}" for n, p in c["against"].items())
                + " |"
            )
    s = record["served"]
    lines += [
        "",
        f"Species served in the broad model (highest fraction of |a| >= {cfg['THRESHOLD']:.4g}) by the "
        "fine-tuned narrow model's channels; chance share of broad species "
        f"{_pct(s['broad_share_by_chance'])}%:",
        "",
        "| channels | count | served a broad species | dead in broad too | mean activity on broad / narrow species |",
        "|---|---|---|---|---|",
    ]
    for kind in ("dead", "alive"):
        t = s[kind]
        act = " / ".join("–" if v is None else f"{v:.3f}" for v in (t["activity_broad"], t["activity_narrow"]))
        lines.append(
            f"| {kind} in narrow | {t['channels']} | {_pct(t['served_by_broad'])}% | "
            f"{t['top_species']['none']} | {act} |"
        )
    text = "\n".join(lines) + "\n"
    write_text(cfg["TABLE"], text)
    return text


if __name__ == "__main__":
    config.run(main, globals())
