"""What the accuracy benchmarks share: one run's model, statistics and loaders, channel rankings, scoring.

A *ranking* is {block: [(prunability, channel), ...]} over the hidden channels of every prunable block
(higher = prune first), the input of ``selection.to_macs_target`` (global allocation) and
``selection.uniform_ratio`` (the same ratio in every block). Ours come from the activation statistics;
torch-pruning's from its importance classes evaluated on each block's one dependency group.
"""

import os
import time

import torch
import torch_pruning as tp

from . import loading, selection
from .activation_stats import ActivationStats
from .artifacts import read_json
from .criterion import Criterion
from .data import Skipped, batches
from .errors import PruneError
from .evaluate import bootstrap_interval
from .experiment import eval_accuracy, prune_copy, recover
from .prune import build_graph, count_macs_params


def load_run(cfg):
    """The baseline of RUN_DIR, its activation statistics (checked to belong to it), data held in memory, MACs."""
    return loading.load_run(cfg, stats=True, in_memory=True)


def resume(path, identity, what):
    """(results, seconds spent) of earlier runs of a benchmark with this same ``identity`` (else {}, 0)."""
    if not os.path.exists(path):
        return {}, 0.0
    saved = read_json(path, what)
    if saved.get("identity") != identity:
        return {}, 0.0
    return saved.get("results", {}), saved.get("seconds", 0.0)


def prunable_blocks(run):
    return [name for name in run.blocks if name in run.per_channel]


def ours(run, score, threshold=None, class_aware=False, min_class_samples=5, output_units=False):
    """Ranking by one of the project's activation scores (threshold: the captured one by default;
    ``output_units``: contribution and fluctuation in block-output units, as the stages' OUTPUT_UNITS)."""
    threshold = ActivationStats.of(run.stats).threshold if threshold is None else threshold
    criterion = Criterion(
        score, threshold, class_aware=class_aware, min_class_samples=min_class_samples, output_units=output_units
    )
    return criterion.rank(run.stats, run.blocks, run.layers, run.model)


def random_ranking(run, seed):
    gen = torch.Generator().manual_seed(seed)
    return {
        b: list(
            zip(
                torch.rand(run.blocks[b]["hidden_channels"], generator=gen).tolist(),
                range(run.blocks[b]["hidden_channels"]),
            )
        )
        for b in prunable_blocks(run)
    }


def taylor_gradients(model, loader, device, n_batches):
    """Accumulate cross-entropy gradients over ``n_batches`` training batches (BN in eval mode)."""
    model.eval().zero_grad()
    loss_fn = torch.nn.CrossEntropyLoss()
    for i, (images, labels) in enumerate(batches(loader, Skipped(), device)):
        if i >= n_batches:
            break
        loss_fn(model(images), labels).backward()


def activation_forward(model, loader, device, importance, n_images):
    """One forward pass over ``n_images`` training images inside ActivationImportance's hooks."""
    images = torch.cat([x for x, _ in batches(loader, Skipped(), device)])[:n_images]
    with importance.compute_importance(model), torch.no_grad():
        model.eval()(images)


def tp_importance(name):
    """torch-pruning's importance object for a criterion name (its defaults, group mean reduction and mean
    normalisation, as its global pruning uses)."""
    importances = {
        "tp_l1": lambda: tp.importance.GroupMagnitudeImportance(p=1),
        "tp_taylor": tp.importance.GroupTaylorImportance,
        "tp_bn_scale": tp.importance.BNScaleImportance,
        "tp_activation": tp.importance.ActivationImportance,
    }
    if name not in importances:
        raise PruneError(f"unknown torch-pruning criterion {name!r}: use one of {', '.join(importances)}")
    return importances[name]()


def torch_pruning_ranking(run, name, taylor_batches=4, activation_images=128):
    """Ranking by torch-pruning's importance ``name`` on each block's whole hidden-channel group."""
    model, importance = run.model, tp_importance(name)
    graph = build_graph(model, run.cfg["IMAGE_SIZE"])
    if name == "tp_taylor":
        taylor_gradients(model, run.loaders["bn"], run.device, taylor_batches)
    if name == "tp_activation":
        activation_forward(model, run.loaders["bn"], run.device, importance, activation_images)
    ranking = {}
    for b in prunable_blocks(run):
        hidden = run.blocks[b]["hidden_channels"]
        group = graph.get_pruning_group(
            model.get_submodule(run.blocks[b]["expand"]), tp.prune_conv_out_channels, list(range(hidden))
        )
        with torch.no_grad():
            imp = importance(group)
        if imp is None or imp.numel() != hidden:
            raise PruneError(f"torch-pruning's {name} gave no importance for block {b}")
        ranking[b] = list(zip((-imp.double().cpu()).tolist(), range(hidden)))
    model.zero_grad(set_to_none=True)
    return ranking


def uniform_to_macs(ranking, run, target, min_keep_ratio, round_to, step=0.0025):
    """(selection, reduction): the same ratio in every block, the ratio whose MACs reduction is nearest ``target``."""
    best = None
    for i in range(int(0.8 / step) + 1):
        chosen = selection.uniform_ratio(ranking, run.blocks, i * step, min_keep_ratio, round_to)
        red = reduction(run, chosen)
        if best is None or abs(red - target) < abs(best[1] - target):
            best = (chosen, red)
    return best


def reduction(run, chosen):
    """Predicted MACs reduction of a selection (hidden-channel MACs are linear in the width)."""
    return sum(len(v) * run.per_channel[b] for b, v in chosen.items()) / run.total


def cell(result, step):
    """ "top-1 [CI low, CI high]" in percent for a table ("–" when the step was not measured)."""
    if step not in result:
        return "–"
    lo, hi = result[step]["ci95"]
    return f"{100 * result[step]['top1']:.1f} [{100 * lo:.0f}, {100 * hi:.0f}]"


def with_intervals(steps):
    """{step: {top1, ci95, correct}} from recover's {step: accuracy}."""
    return {
        step: {"top1": acc["top1"], "ci95": list(bootstrap_interval(acc["correct"])), "correct": acc["correct"]}
        for step, acc in steps.items()
    }


def score_baseline(run):
    """The unpruned baseline's accuracy on the eval split."""
    return eval_accuracy(run.model, run.loaders, run.class_names, run.device, "baseline")


def prune_and_score(run, chosen, cfg, compensate_fn=None, model=None):
    """Prune a copy of the baseline (or of ``model``, already pruned), recover it; the measured record."""
    if model is None:
        model, _ = prune_copy(run.model, run.blocks, chosen, cfg["IMAGE_SIZE"], run.stats, compensate_fn)
    macs, params = count_macs_params(model, cfg["IMAGE_SIZE"])
    t0 = time.perf_counter()
    steps = recover(model, run.loaders, run.class_names, run.device, cfg, log=lambda *_: None)
    return {
        "seconds_to_score": round(time.perf_counter() - t0, 1),
        "macs_reduction": round(1 - macs / run.total, 6),
        "params_reduction": round(1 - params / run.params, 6),
        "kept": {b: run.blocks[b]["hidden_channels"] - len(v) for b, v in chosen.items()},
        **with_intervals(steps),
    }
