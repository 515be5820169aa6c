"""Which hidden channels to remove: floors and rounding, proposals, one global ranking, the MACs target.

Every selection keeps the per-block floors (``MIN_KEEP_RATIO``, ``FLOOR`` channels) and rounds every
block's kept count to a multiple of ``ROUND_TO``. A *proposal* (threshold mode) prunes a block's candidates,
most prunable first, down to the floors; ``from_plan`` takes exactly a plan's indices. In ``target_macs``
mode the channels of all blocks are ranked by one score and taken most prunable first; a block gives up
channels in whole ``ROUND_TO`` chunks (its next chunk's score is the score of its least prunable channel, or,
for obs, the chunk's summed cost per MAC saved), so the rounding never undoes the ranking.
"""

import heapq
import math
import warnings

import torch

from .errors import PruneError

FLOOR = 8  # never keep fewer hidden channels than this (or all of them, in a block narrower than this)


def min_kept(hidden, min_keep_ratio=0.25, floor=FLOOR):
    """The fewest channels a block of ``hidden`` may keep: ceil(ratio x hidden), and ``floor`` (or all, if fewer)."""
    if not 0 <= min_keep_ratio <= 1:
        raise PruneError(f"MIN_KEEP_RATIO must lie in [0, 1], not {min_keep_ratio}")
    return max(math.ceil(round(min_keep_ratio * hidden, 9)), min(floor, hidden))


def keep_count(hidden, n_candidates, min_keep_ratio=0.25, floor=FLOOR, round_to=8):
    """Channels kept when ``n_candidates`` may go: the floors, then rounded up to ``round_to`` (all if that exceeds)."""
    if not 0 <= n_candidates <= hidden:
        raise PruneError(f"{n_candidates} candidates for a block of {hidden} channels")
    if round_to < 1:
        raise PruneError(f"ROUND_TO must be at least 1, not {round_to}")
    kept = max(hidden - n_candidates, min_kept(hidden, min_keep_ratio, floor))
    rounded = -(-kept // round_to) * round_to
    return rounded if rounded <= hidden else hidden


def most_prunable(prun, candidate, count):
    """Sorted indices of the ``count`` candidates with the highest prunability (ties: lower index first)."""
    idx = torch.nonzero(candidate).flatten()
    order = torch.sort(prun[idx], descending=True, stable=True).indices
    return sorted(idx[order[:count]].tolist())


def proposal(hidden, prun, candidate, min_keep_ratio=0.25, round_to=8):
    """(candidates, kept, indices to prune) of one block: its most prunable candidates, floors kept."""
    n = int(candidate.sum())
    kept = keep_count(hidden, n, min_keep_ratio, FLOOR, round_to)
    return n, kept, most_prunable(prun, candidate, hidden - kept)


def from_plan(plan, blocks, skip_blocks=(), min_keep_ratio=0.25, round_to=8):
    """{block: indices} exactly as the plan lists them (SKIP_BLOCKS left out); a block below the floor is refused."""
    selection = {}
    for name, entry in plan["blocks"].items():
        idxs = sorted(entry["prune"])
        if not idxs or name in skip_blocks:
            continue
        hidden = blocks[name]["hidden_channels"]
        kept = hidden - len(idxs)
        if kept < min_kept(hidden, min_keep_ratio):
            raise PruneError(
                f"plan block {name} keeps {kept} of {hidden} channels, below the floor of "
                f"{min_kept(hidden, min_keep_ratio)} (MIN_KEEP_RATIO={min_keep_ratio}, 8 channels)"
            )
        if kept % round_to:
            warnings.warn(
                f"plan block {name} keeps {kept} channels, not a multiple of ROUND_TO={round_to}: "
                "pruned as the plan says",
                stacklevel=2,
            )
        selection[name] = idxs
    return selection


def _chunks(order, hidden, floor, round_to):
    """Removal steps of one block: slices of ``order`` whose removal lands the kept count on a ROUND_TO multiple."""
    limit = min(hidden - floor, len(order))
    size = hidden % round_to or round_to
    steps, start = [], 0
    while start + size <= limit:
        steps.append(order[start : start + size])
        start, size = start + size, round_to
    return steps


def ranked_steps(ranking, blocks, min_keep_ratio=0.25, round_to=8):
    """{block: [(priority, chunk)]}: each block's ROUND_TO chunks, most prunable first, with the prunability of
    the chunk's least prunable channel as its priority (higher = taken first).

    ``ranking``: {block: [(prunability, channel), ...]} over the block's channels that may be removed.
    """
    steps = {}
    for name, ranked in ranking.items():
        hidden = blocks[name]["hidden_channels"]
        channels = [c for _, c in sorted(ranked, key=lambda r: (-r[0], r[1]))]
        score = {c: p for p, c in ranked}
        steps[name] = [
            (min(score[c] for c in step), step)
            for step in _chunks(channels, hidden, min_kept(hidden, min_keep_ratio), round_to)
        ]
    return steps


def costed_steps(removals, blocks, per_channel_macs, min_keep_ratio=0.25, round_to=8):
    """{block: [(priority, chunk)]} from {block: [(channel, cost of removing it next), ...]} in removal order
    (e.g. greedy OBS): a chunk's priority is minus its summed cost per MAC it saves (higher = taken first)."""
    steps = {}
    for name, removal in removals.items():
        hidden, cost = blocks[name]["hidden_channels"], dict(removal)
        chunks = _chunks([c for c, _ in removal], hidden, min_kept(hidden, min_keep_ratio), round_to)
        steps[name] = [(-sum(cost[c] for c in step) / (len(step) * per_channel_macs[name]), step) for step in chunks]
    return steps


def to_macs_target(
    ranking,
    blocks,
    per_channel_macs,
    total_macs,
    target,
    min_keep_ratio=0.25,
    round_to=8,
    max_overshoot=None,
    steps=None,
):
    """{block: indices} removing at least ``target`` (a fraction) of ``total_macs``, most prunable chunks first.

    ``ranking``: {block: [(prunability, channel), ...]} over the block's channels that may be removed (or
    ``steps`` from ``costed_steps``, ranking ``None``). Returns (selection, predicted MACs reduction). Stops
    early, below target, when nothing is left to take. With ``max_overshoot`` (a fraction of MACs) a chunk
    that would overshoot the target by more is passed over, with the rest of its block, for the next most
    prunable one (an early block's chunk of ROUND_TO channels can be > 1% of the MACs): criteria compared at
    matched MACs then stay within that tolerance.
    """
    if not 0 < target < 1:
        raise PruneError(f"TARGET_MACS_REDUCTION={target} must lie in (0, 1)")
    if steps is None:
        steps = ranked_steps(
            {b: r for b, r in ranking.items() if b in per_channel_macs}, blocks, min_keep_ratio, round_to
        )
    heap = [(-chunks[0][0], order, name, 0) for order, (name, chunks) in enumerate(steps.items()) if chunks]
    heapq.heapify(heap)
    selection, removed = {}, 0
    while heap and removed < target * total_macs:
        _, order, name, i = heapq.heappop(heap)
        step = steps[name][i][1]
        if (
            max_overshoot is not None
            and removed + len(step) * per_channel_macs[name] > (target + max_overshoot) * total_macs
        ):
            continue
        selection.setdefault(name, []).extend(step)
        removed += len(step) * per_channel_macs[name]
        if i + 1 < len(steps[name]):
            heapq.heappush(heap, (-steps[name][i + 1][0], order, name, i + 1))
    return {k: sorted(v) for k, v in selection.items()}, removed / total_macs


def uniform_ratio(ranking, blocks, ratio, min_keep_ratio=0.25, round_to=8):
    """{block: indices}: the same fraction of every block's hidden channels, most prunable first."""
    selection = {}
    for name, ranked in ranking.items():
        hidden = blocks[name]["hidden_channels"]
        kept = max(hidden - int(round(ratio * hidden)), min_kept(hidden, min_keep_ratio))
        kept = min(-(-kept // round_to) * round_to, hidden)
        channels = [c for _, c in sorted(ranked, key=lambda r: (-r[0], r[1]))][: hidden - kept]
        if channels:
            selection[name] = sorted(channels)
    return selection
