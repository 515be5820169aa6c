"""Choosing channels to a MACs target or a uniform ratio: ranking order, floors, ROUND_TO and the tolerance."""

import pytest

from mbv3prune import selection
from mbv3prune.errors import PruneError

BLOCKS = {"a": {"hidden_channels": 64}, "b": {"hidden_channels": 40}, "c": {"hidden_channels": 16}}
PER_CHANNEL = {"a": 10, "b": 1, "c": 100}  # MACs removed per channel: block c's chunks are large
TOTAL = 64 * 10 + 40 * 1 + 16 * 100 + 1000


def ranking(**prefer):
    """Every channel of every block with prunability ``prefer[block]`` minus a small per-channel decrement."""
    return {b: [(prefer.get(b, 0.0) - 1e-3 * c, c) for c in range(r["hidden_channels"])] for b, r in BLOCKS.items()}


def kept(chosen):
    return {b: BLOCKS[b]["hidden_channels"] - len(chosen.get(b, [])) for b in BLOCKS}


def test_reaches_the_target_taking_the_most_prunable_block_first():
    chosen, red = selection.to_macs_target(ranking(a=1.0), BLOCKS, PER_CHANNEL, TOTAL, 0.1, round_to=8)
    assert red >= 0.1 and set(chosen) == {"a"}
    assert chosen["a"] == list(range(len(chosen["a"])))  # the most prunable channels of the block
    assert red == sum(len(v) * PER_CHANNEL[b] for b, v in chosen.items()) / TOTAL


def test_floors_and_round_to_hold_for_every_block():
    chosen, _ = selection.to_macs_target(ranking(), BLOCKS, PER_CHANNEL, TOTAL, 0.99, min_keep_ratio=0.25, round_to=8)
    for b, k in kept(chosen).items():
        assert k % 8 == 0 and k >= max(8, BLOCKS[b]["hidden_channels"] // 4)


def test_max_overshoot_passes_over_a_chunk_too_large_for_the_tolerance():
    target = 0.05
    plain, red = selection.to_macs_target(ranking(c=1.0), BLOCKS, PER_CHANNEL, TOTAL, target, round_to=8)
    assert set(plain) == {"c"} and red - target > 0.1  # one chunk of c is 800 MACs, 24% of the total
    tight, red = selection.to_macs_target(
        ranking(c=1.0), BLOCKS, PER_CHANNEL, TOTAL, target, round_to=8, max_overshoot=0.01
    )
    assert "c" not in tight and target <= red <= target + 0.01


def test_uniform_ratio_takes_the_same_share_of_every_block_rounded_to_round_to():
    chosen = selection.uniform_ratio(ranking(), BLOCKS, 0.25, round_to=8)
    assert kept(chosen) == {"a": 48, "b": 32, "c": 16}  # 16 of c would leave 12 -> rounded up to 16 (none)


def test_a_target_outside_zero_one_is_refused():
    with pytest.raises(PruneError, match="TARGET_MACS_REDUCTION"):
        selection.to_macs_target(ranking(), BLOCKS, PER_CHANNEL, TOTAL, 1.0)
