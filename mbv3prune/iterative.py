"""Dynamic deadness: prune block by block in forward order, re-measuring what is downstream after each round.

Pruning a block changes the activations of every block after it, so a plan measured once on the unpruned
model is stale after its first block. Each round prunes the earliest ``blocks_per_round`` blocks that
still have qualifying channels, then captures again, on the pruned model and the same sample, only the
blocks downstream of the change (upstream blocks keep their statistics). A channel qualifies only when it
is a candidate in the initial measurement AND in the latest one ("consistent deadness"); a channel that
came alive is spared and logged. Every block is pruned at most once, in its original channel numbering,
so the floors and ROUND_TO hold exactly as in one-shot pruning.

With ``opts["quotas"]`` ({block: channels to remove}, e.g. a one-shot selection's counts) the rounds take
exactly each block's quota instead of its threshold candidates, ranked by the *consistent* prunability
min(initial, latest): the same MACs as the one-shot selection, chosen on re-measured activations.
"""
import copy

import torch

from .capture import capture
from .plan import block_candidates, keep_count, most_prunable, proposal_map
from .blocks import find_blocks
from .prune import count_macs_params, prune_blocks


def candidates(stats, blocks, layers, opts):
    """{block: (prunability, candidate mask)} for every prunable block present in ``stats``."""
    out = {}
    for name, roles in blocks.items():
        layer = layers.get(name)
        if "expand" not in roles or name in opts["skip_blocks"] or f"{layer}/n" not in stats:
            continue
        out[name] = block_candidates(stats, roles, layer, opts["score"], opts["threshold"], opts["deadness_threshold"],
                                     opts["class_aware"], opts["min_class_samples"], opts.get("weights"))
    return out


def _round_selection(blocks, todo, initial, latest, opts):
    """{block: indices} for this round: candidates in both measurements, the most prunable, floors kept."""
    chosen, spared = {}, {}
    for name in todo:
        prun, now = latest[name]
        if opts.get("quotas"):
            consistent = torch.minimum(prun, initial[name][0].to(prun.device))
            chosen[name] = most_prunable(consistent, torch.ones_like(now), opts["quotas"][name])
            spared[name] = []
            continue
        qualify = initial[name][1].to(now.device) & now
        spared[name] = torch.nonzero(initial[name][1].to(now.device) & ~now).flatten().tolist()
        hidden = blocks[name]["hidden_channels"]
        kept = keep_count(hidden, int(qualify.sum()), opts["min_keep_ratio"], round_to=opts["round_to"])
        idxs = most_prunable(prun, qualify, hidden - kept)
        if idxs:
            chosen[name] = idxs
    return chosen, spared


def _next_blocks(order, done, initial, latest, blocks, opts, count):
    """The earliest ``count`` not-yet-pruned blocks whose consistent candidates survive the floors."""
    picked = []
    for name in order:
        if name in done or name not in latest or (opts.get("quotas") and not opts["quotas"].get(name)):
            continue
        chosen, _ = _round_selection(blocks, [name], initial, latest, opts)
        if chosen:
            picked.append(name)
        if len(picked) == count:
            break
    return picked


def run(model, sample_batches, stats, layers, opts, image_size, num_classes, compensate_fn=None, score_fn=None,
        log=print):
    """Iteratively prune a copy of ``model``: (pruned model, per-round log, {block: removed indices}, values).

    ``values``: per block the channels' prunability (deadness for SCORE=deadness) initially and in the
    latest measurement before the block was pruned.

    ``sample_batches()`` yields the stratified sample's (images, labels) on the model's device; ``stats``
    are the initial statistics; ``opts`` holds score, threshold, deadness_threshold, class_aware,
    min_class_samples, min_keep_ratio, round_to, skip_blocks, blocks_per_round, max_rounds,
    target_macs_reduction (0 = none), capture_point and optionally quotas.
    ``compensate_fn(model, blocks, selection, stats)`` folds removed channels in before each prune; ``score_fn(model)`` gives a top-1 for the log.
    """
    pruned = copy.deepcopy(model).eval()
    blocks = find_blocks(pruned)
    layers = proposal_map(layers)
    total, _ = count_macs_params(pruned, image_size)
    initial = candidates(stats, blocks, layers, opts)
    latest, latest_stats = dict(initial), dict(stats)
    order, done, removed, rounds = list(blocks), set(), {}, []
    for round_no in range(1, opts["max_rounds"] + 1):
        todo = _next_blocks(order, done, initial, latest, blocks, opts, opts["blocks_per_round"])
        if not todo:
            log(f"round {round_no}: no channel is consistently dead any more; stopping")
            break
        chosen, spared = _round_selection(blocks, todo, initial, latest, opts)
        if compensate_fn is not None:
            compensate_fn(pruned, blocks, chosen, latest_stats)
        prune_blocks(pruned, blocks, chosen, image_size)
        done.update(todo)
        removed.update(chosen)
        blocks = find_blocks(pruned)
        downstream = {b: r for b, r in blocks.items() if order.index(b) > max(order.index(t) for t in todo)}
        remeasured = [b for b in downstream if b in initial and b not in done]
        if remeasured:
            fresh, _ = capture(pruned, sample_batches(), {b: blocks[b] for b in remeasured}, opts["capture_point"],
                               opts["threshold"], num_classes, progress=False)
            latest_stats.update(fresh)
            latest.update(candidates(fresh, {b: blocks[b] for b in remeasured}, layers, opts))
        macs, params = count_macs_params(pruned, image_size)
        came_alive = {b: c for b, c in _came_alive(initial, latest, remeasured).items() if c}
        entry = {"round": round_no, "pruned": {b: len(v) for b, v in chosen.items()},
                 "spared_came_alive": {b: spared[b] for b in todo if spared[b]},
                 "came_alive_downstream": came_alive, "remeasured": remeasured,
                 "macs": macs, "params": params, "macs_reduction": round(1 - macs / total, 6),
                 **({"top1": score_fn(pruned)} if score_fn else {})}
        rounds.append(entry)
        log(f"round {round_no}: pruned {entry['pruned']}, spared {sum(map(len, entry['spared_came_alive'].values()))} "
            f"that came alive, MACs -{100 * entry['macs_reduction']:.1f}%, re-measured {len(remeasured)} blocks"
            + (f", top-1 {entry['top1']:.4f}" if score_fn else ""))
        if opts["target_macs_reduction"] and entry["macs_reduction"] >= opts["target_macs_reduction"]:
            log(f"round {round_no}: TARGET_MACS_REDUCTION reached; stopping")
            break
    values = {"initial_values": {b: v[0].cpu() for b, v in initial.items()},
              "latest_values": {b: v[0].cpu() for b, v in latest.items()}}
    return pruned, rounds, removed, values


def _came_alive(initial, latest, names):
    """{block: channels that were candidates initially and are not in the latest measurement}."""
    return {b: torch.nonzero(initial[b][1] & ~latest[b][1].to(initial[b][1].device)).flatten().tolist() for b in names}
