"""Dynamic deadness: prune block by block in forward order, re-measuring what is downstream after each round.

Pruning a block changes the activations of every block after it, so a plan measured once on the unpruned
model is stale after its first block. Each round prunes the earliest ``blocks_per_round`` blocks that
still have qualifying channels, then captures again, on the pruned model and the same sample, only the
blocks downstream of the change (upstream blocks keep their statistics). A channel qualifies only when it
is a candidate in the initial measurement AND in the latest one ("consistent deadness"); a channel that
came alive is spared and logged. Every block is pruned at most once, in its original channel numbering,
so the floors and ROUND_TO hold exactly as in one-shot pruning.

With ``Schedule.quotas`` ({block: channels to remove}, e.g. a one-shot selection's counts) the rounds take
exactly each block's quota instead of its threshold candidates, ranked by the *consistent* prunability
min(initial, latest): the same MACs as the one-shot selection, chosen on re-measured activations.
"""

import copy
import dataclasses

import torch

from .blocks import find_blocks, prunable
from .capture import capture
from .criterion import proposal_map
from .data import Skipped, batches
from .prune import count_macs_params, prune_blocks
from .selection import most_prunable


@dataclasses.dataclass(frozen=True)
class Schedule:
    """How the rounds go: blocks per round, most rounds, a MACs target to stop at (0 = none), per-block quotas."""

    blocks_per_round: int = 1
    max_rounds: int = 30
    target_macs_reduction: float = 0.0
    quotas: dict = None


def candidates(stats, blocks, layers, criterion, weights=None):
    """{block: (prunability, candidate mask)} for every prunable block present in ``stats``."""
    out = {}
    for name, roles in blocks.items():
        layer = layers.get(name)
        if not prunable(roles) or name in criterion.skip_blocks or f"{layer}/n" not in stats:
            continue
        out[name] = criterion.candidates(stats, roles, layer, weights, name)
    return out


def _round_selection(blocks, todo, initial, latest, criterion, schedule):
    """{block: indices} for this round: candidates in both measurements, the most prunable, floors kept."""
    chosen, spared = {}, {}
    for name in todo:
        prun, now = latest[name]
        if schedule.quotas:
            consistent = torch.minimum(prun, initial[name][0].to(prun.device))
            chosen[name] = most_prunable(consistent, torch.ones_like(now), schedule.quotas[name])
            spared[name] = []
            continue
        qualify = initial[name][1].to(now.device) & now
        spared[name] = torch.nonzero(initial[name][1].to(now.device) & ~now).flatten().tolist()
        hidden = blocks[name]["hidden_channels"]
        idxs = most_prunable(prun, qualify, hidden - criterion.keep_count(hidden, int(qualify.sum())))
        if idxs:
            chosen[name] = idxs
    return chosen, spared


def _next_blocks(order, done, initial, latest, blocks, criterion, schedule):
    """The earliest ``blocks_per_round`` not-yet-pruned blocks whose consistent candidates survive the floors."""
    picked = []
    for name in order:
        if name in done or name not in latest or (schedule.quotas and not schedule.quotas.get(name)):
            continue
        chosen, _ = _round_selection(blocks, [name], initial, latest, criterion, schedule)
        if chosen:
            picked.append(name)
        if len(picked) == schedule.blocks_per_round:
            break
    return picked


def run(
    model,
    sample_batches,
    stats,
    layers,
    criterion,
    schedule,
    *,
    capture_point,
    image_size,
    num_classes,
    weights=None,
    compensate_fn=None,
    score_fn=None,
    second_moments=False,
    log=print,
):
    """Iteratively prune a copy of ``model``: (pruned model, per-round log, {block: removed indices}, values).

    ``values``: per block the channels' prunability (deadness for SCORE=deadness) initially and in the
    latest measurement before the block was pruned.

    ``sample_batches()`` yields the stratified sample's (images, labels), the images on the model's device;
    ``stats`` are the initial statistics (captured at ``capture_point``); ``criterion`` (a ``criterion.Criterion``)
    says which channels are candidates, ``schedule`` (a ``Schedule``) how the rounds go; ``weights``: the
    model whose project convs weigh the weighted scores. ``compensate_fn(model, blocks, selection, stats)``
    folds removed channels in before each prune; ``score_fn(model)`` gives a top-1 for the log.
    ``second_moments``: the re-captures also stream the covariances (for SCORE=obs and a oneshot refit).
    """
    pruned = copy.deepcopy(model).eval()
    blocks = find_blocks(pruned)
    layers = proposal_map(layers)
    total, _ = count_macs_params(pruned, image_size)
    initial = candidates(stats, blocks, layers, criterion, weights)
    latest, latest_stats = dict(initial), dict(stats)
    order, done, removed, rounds = list(blocks), set(), {}, []
    for round_no in range(1, schedule.max_rounds + 1):
        todo = _next_blocks(order, done, initial, latest, blocks, criterion, schedule)
        if not todo:
            log(f"round {round_no}: no channel is consistently dead any more; stopping")
            break
        chosen, spared = _round_selection(blocks, todo, initial, latest, criterion, schedule)
        if compensate_fn is not None:
            compensate_fn(pruned, blocks, chosen, latest_stats)
        prune_blocks(pruned, blocks, chosen, image_size)
        done.update(todo)
        removed.update(chosen)
        blocks = find_blocks(pruned)
        downstream = {b: r for b, r in blocks.items() if order.index(b) > max(order.index(t) for t in todo)}
        remeasured = [b for b in downstream if b in initial and b not in done]
        if remeasured:
            fresh, _ = capture(
                pruned,
                sample_batches(),
                {b: blocks[b] for b in remeasured},
                capture_point,
                criterion.threshold,
                num_classes,
                progress=False,
                second_moments=second_moments,
                per_class="histograms" if criterion.class_aware else "off",
            )
            latest_stats.update(fresh)
            latest.update(candidates(fresh, {b: blocks[b] for b in remeasured}, layers, criterion, weights))
        macs, params = count_macs_params(pruned, image_size)
        came_alive = {b: c for b, c in _came_alive(initial, latest, remeasured).items() if c}
        entry = {
            "round": round_no,
            "pruned": {b: len(v) for b, v in chosen.items()},
            "spared_came_alive": {b: spared[b] for b in todo if spared[b]},
            "came_alive_downstream": came_alive,
            "remeasured": remeasured,
            "macs": macs,
            "params": params,
            "macs_reduction": round(1 - macs / total, 6),
            **({"top1": score_fn(pruned)} if score_fn else {}),
        }
        rounds.append(entry)
        log(
            f"round {round_no}: pruned {entry['pruned']}, spared {sum(map(len, entry['spared_came_alive'].values()))} "
            f"that came alive, MACs -{100 * entry['macs_reduction']:.1f}%, re-measured {len(remeasured)} blocks"
            + (f", top-1 {entry['top1']:.4f}" if score_fn else "")
        )
        if schedule.target_macs_reduction and entry["macs_reduction"] >= schedule.target_macs_reduction:
            log(f"round {round_no}: TARGET_MACS_REDUCTION reached; stopping")
            break
    values = {
        "initial_values": {b: v[0].cpu() for b, v in initial.items()},
        "latest_values": {b: v[0].cpu() for b, v in latest.items()},
    }
    return pruned, rounds, removed, values


def _came_alive(initial, latest, names):
    """{block: channels that were candidates initially and are not in the latest measurement}."""
    return {b: torch.nonzero(initial[b][1] & ~latest[b][1].to(initial[b][1].device)).flatten().tolist() for b in names}


def run_loaded(loaded, loader, criterion, schedule, compensate_fn=None, **options):
    """``run`` on a run from ``loading.load_run`` (its model, statistics, layers, capture point, classes and
    image size), re-measuring on ``loader``'s images; ``options``: score_fn, second_moments, log."""
    return run(
        loaded.model,
        lambda: batches(loader, Skipped(), loaded.device, labels_on_device=False),
        loaded.stats,
        loaded.layers,
        criterion,
        schedule,
        capture_point=loaded.capture_point,
        image_size=loaded.cfg["IMAGE_SIZE"],
        num_classes=len(loaded.class_names),
        weights=loaded.model,
        compensate_fn=compensate_fn,
        **options,
    )
