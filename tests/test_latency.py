"""Tests of mbv3prune.latency: the width grid, the narrowed blocks, the cached table, and the latency-target
selection on INJECTED tables (merging of chunks that save no time, stop at target, floors, ROUND_TO, cost per
ms). Timing runs only to check the table's structure and its cache; no speed is asserted."""

import random

import pytest
import torch

from mbv3prune import latency, selection
from mbv3prune.artifacts import read_json
from mbv3prune.blocks import find_blocks
from mbv3prune.errors import PruneError
from mbv3prune.plan import min_kept
from mbv3prune.timing import interleaved_ms, median_ms, synchronizer
from tests.helpers import randomized_model

SIZE = 32


def _blocks(**hidden):
    """Minimal roles: {name: {"expand", "hidden_channels"}}."""
    return {name: {"expand": f"{name}.expand", "hidden_channels": h} for name, h in hidden.items()}


def _table(model_ms, **ms):
    """An injected table: {block: {width: ms}} widest first."""
    return {"model_ms": model_ms, "blocks": {n: {"hidden": max(t), "ms": t} for n, t in ms.items()}}


def _linear(hidden, floor, round_to, per_channel, base=1.0):
    return {w: base + per_channel * w for w in latency.width_grid(hidden, floor, round_to)}


def _ranking(hidden, scores):
    return list(zip(scores, range(hidden)))


def test_width_grid_gives_the_kept_counts_of_the_macs_chunks():
    assert latency.width_grid(72, 18, 8) == [72, 64, 56, 48, 40, 32, 24]
    assert latency.width_grid(100, 25, 8) == [100, 96, 88, 80, 72, 64, 56, 48, 40, 32]
    assert latency.width_grid(16, 8, 8) == [16, 8]
    assert latency.width_grid(8, 8, 8) == [8]
    for hidden, ratio, round_to in [(72, 0.25, 8), (100, 0.3, 8), (240, 0.25, 16), (20, 0.0, 8)]:
        floor = min_kept(hidden, ratio)
        chunks = selection._chunks(list(range(hidden)), hidden, floor, round_to)
        kept = [hidden - sum(map(len, chunks[: i + 1])) for i in range(len(chunks))]
        assert latency.width_grid(hidden, floor, round_to) == [hidden] + kept


def test_a_chunk_that_saves_no_time_is_merged_with_the_next():
    ms = {64: 10.0, 56: 10.5, 48: 9.0, 40: 8.0, 32: 8.2, 24: 8.1}
    assert latency.latency_steps(ms, 64, 24, 8) == [(16, 1.0), (8, 1.0)]  # 32 and 24 never beat 40: left out
    assert latency.latency_steps(ms, 64, 24, 8, limit=8) == []  # the one allowed chunk saves nothing
    with pytest.raises(PruneError, match="width 40"):
        latency.latency_steps({64: 1.0, 56: 0.9, 48: 0.8}, 64, 24, 8)


def test_cost_ranking_takes_the_cheapest_per_millisecond_and_stops_at_target():
    # a: each 8-channel chunk costs 8 and saves 1 ms (8 per ms); b: costs 4 and saves 0.1 ms (40 per ms)
    blocks = _blocks(a=32, b=32)
    table = _table(10.0, a=_linear(32, 8, 8, 1 / 8), b=_linear(32, 8, 8, 0.1 / 8))
    ranking = {"a": _ranking(32, [1.0] * 32), "b": _ranking(32, [0.5] * 32)}
    chosen, red = latency.to_latency_target(ranking, blocks, table, 0.1, 0.25, 8, kind="cost")
    assert chosen == {"a": list(range(8))} and red == pytest.approx(0.1)
    chosen, red = latency.to_latency_target(ranking, blocks, table, 0.305, 0.25, 8, kind="cost")
    assert chosen == {"a": list(range(24)), "b": list(range(8))}  # a is down to its floor of 8, then b
    assert red == pytest.approx(0.31)
    chosen, red = latency.to_latency_target(ranking, blocks, table, 0.99, 0.25, 8, kind="cost")
    assert {k: len(v) for k, v in chosen.items()} == {"a": 24, "b": 24}  # nothing left: below target
    assert red == pytest.approx(0.33)


def test_merged_chunk_costs_the_sum_of_its_channels_per_millisecond_saved():
    # a's first chunk saves nothing, so it merges with the second: 16 channels of cost 1 for 1 ms (16 per ms);
    # b: 8 channels of cost 1.5 for 1 ms (12 per ms) goes first although each channel costs more
    blocks = _blocks(a=32, b=16)
    table = _table(10.0, a={32: 5.0, 24: 5.0, 16: 4.0, 8: 3.0}, b={16: 5.0, 8: 4.0})
    ranking = {"a": _ranking(32, [1.0] * 32), "b": _ranking(16, [1.5] * 16)}
    chosen, red = latency.to_latency_target(ranking, blocks, table, 0.1, 0.25, 8, kind="cost")
    assert chosen == {"b": list(range(8))} and red == pytest.approx(0.1)
    chosen, red = latency.to_latency_target(ranking, blocks, table, 0.2, 0.25, 8, kind="cost")
    assert chosen == {"a": list(range(16)), "b": list(range(8))} and red == pytest.approx(0.2)


def test_cost_ranking_removes_the_cheapest_channels_of_a_block():
    blocks = _blocks(a=16)
    costs = [5.0, 0.1, 3.0, 0.2, 4.0, 0.3, 6.0, 0.4, 7.0, 0.5, 8.0, 0.6, 9.0, 0.7, 10.0, 0.8]
    table = _table(4.0, a={16: 2.0, 8: 1.0})
    chosen, _ = latency.to_latency_target({"a": _ranking(16, costs)}, blocks, table, 0.2, 0.25, 8, kind="cost")
    assert chosen == {"a": [1, 3, 5, 7, 9, 11, 13, 15]}


def test_prunability_ranks_as_the_macs_target_does_when_time_is_linear_in_macs():
    rng = random.Random(0)
    hidden = {"a": 72, "b": 96, "c": 240, "d": 40}
    blocks = _blocks(**hidden)
    ranking = {n: _ranking(h, [rng.random() for _ in range(h)]) for n, h in hidden.items()}
    per_channel = {"a": 300, "b": 50, "c": 120, "d": 900}  # MACs of one channel
    total = 10**6
    table = _table(2.0, **{n: _linear(h, min_kept(h), 8, 2.0 * per_channel[n] / total, 0.3) for n, h in hidden.items()})
    for target in (0.05, 0.1, 0.2):
        by_macs, macs_red = selection.to_macs_target(ranking, blocks, per_channel, total, target)
        by_time, time_red = latency.to_latency_target(ranking, blocks, table, target)
        assert by_time == by_macs and time_red == pytest.approx(macs_red)


@pytest.mark.parametrize("kind", latency.SCORE_KINDS)
@pytest.mark.parametrize("seed", range(4))
def test_floors_and_round_to_hold_on_random_tables(kind, seed):
    rng = random.Random(seed)
    round_to, ratio = rng.choice([4, 8, 16]), rng.choice([0.1, 0.25, 0.5])
    hidden = {f"b{i}": rng.randrange(9, 200) for i in range(5)}
    blocks = _blocks(**hidden)
    table = _table(
        50.0,
        **{
            n: {w: rng.uniform(0.5, 2.0) for w in latency.width_grid(h, min_kept(h, ratio), round_to)}
            for n, h in hidden.items()
        },
    )
    ranking = {n: _ranking(h, [rng.random() for _ in range(h)]) for n, h in hidden.items()}
    chosen, red = latency.to_latency_target(ranking, blocks, table, 0.9, ratio, round_to, kind=kind)
    for name, idxs in chosen.items():
        kept = hidden[name] - len(idxs)
        assert kept >= min_kept(hidden[name], ratio) and kept % round_to == 0 and len(set(idxs)) == len(idxs)
        assert table["blocks"][name]["ms"][kept] < table["blocks"][name]["ms"][hidden[name]]  # each block saves
    saved = sum(
        table["blocks"][n]["ms"][hidden[n]] - table["blocks"][n]["ms"][hidden[n] - len(v)] for n, v in chosen.items()
    )
    assert red == pytest.approx(saved / 50.0)


def test_a_table_of_another_model_is_refused_and_a_block_at_its_floor_skipped():
    blocks = _blocks(a=32)
    ranking = {"a": _ranking(32, [0.0] * 32)}
    with pytest.raises(PruneError, match="measured at 24 channels"):
        latency.to_latency_target(ranking, blocks, _table(1.0, a={24: 1.0, 16: 0.5}), 0.1)
    with pytest.raises(PruneError, match="no block a"):
        latency.to_latency_target(ranking, blocks, _table(1.0, b={32: 1.0}), 0.1)
    at_floor = {"a": _ranking(32, [0.0] * 32), "c": _ranking(8, [0.0] * 8)}  # c has nothing to give: not in tables
    assert latency.to_latency_target(
        at_floor, _blocks(a=32, c=8), _table(1.0, a={32: 1.0, 24: 0.5, 16: 0.4, 8: 0.3}), 0.1
    )[0] == {"a": list(range(8))}
    with pytest.raises(PruneError, match="TARGET_LATENCY_REDUCTION"):
        latency.to_latency_target(ranking, blocks, _table(1.0, a={32: 1.0}), 1.5)
    with pytest.raises(PruneError, match="LATENCY_RUNTIME"):
        latency.TableSpec(runtime="tensorrt")


def test_timing_medians_are_positive_and_interleaved_calls_all_run():
    counts = {"a": 0, "b": 0}

    def bump(name):
        def call():
            counts[name] += 1

        return call

    ms = interleaved_ms({n: bump(n) for n in counts}, repeats=5, warmup=2)
    assert counts == {"a": 7, "b": 7} and all(v >= 0 for v in ms.values())
    assert median_ms(lambda: sum(range(1000)), repeats=3, warmup=0) > 0
    with pytest.raises(PruneError, match="repeats"):
        median_ms(lambda: None, repeats=0)


def test_synchronizer_waits_for_the_device_that_runs_asynchronously(monkeypatch):
    waited = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: waited.append(("cuda", str(device))))
    monkeypatch.setattr(torch.mps, "synchronize", lambda: waited.append(("mps", None)))
    syncs = [synchronizer(device) for device in ("cpu", "cuda:1", "mps")]
    assert waited == []  # made, not yet called
    for sync in syncs:
        sync()
    assert waited == [("cuda", "cuda:1"), ("mps", None)]


@pytest.fixture(scope="module")
def small():
    model = randomized_model("mobilenet_v3_small", seed=0, size=SIZE)
    return model, find_blocks(model)


def test_narrowed_blocks_have_the_grid_widths_and_the_real_input_shapes(small):
    model, blocks = small
    spec = latency.TableSpec(image_size=SIZE, round_to=32, runtime="eager")
    narrowed = latency.narrowed_blocks(model, blocks, spec)
    shapes = latency.block_input_shapes(model, list(narrowed), SIZE)
    assert list(narrowed) == [n for n, r in blocks.items() if "expand" in r]
    for name, by_width in narrowed.items():
        roles = blocks[name]
        assert list(by_width) == latency.width_grid(roles["hidden_channels"], min_kept(roles["hidden_channels"]), 32)
        assert shapes[name][0] == roles["in_channels"]
        for width, block in by_width.items():
            expand = block.get_submodule(roles["expand"].removeprefix(name + "."))
            assert expand.out_channels == width
            with torch.no_grad():
                out = block(torch.randn(2, *shapes[name]))
            assert out.shape[:2] == (2, roles["out_channels"])


def test_eager_table_is_cached_and_reused_only_on_the_same_identity(small, tmp_path):
    model, blocks = small
    path = tmp_path / "latency_table.json"
    spec = latency.TableSpec(image_size=SIZE, round_to=64, runtime="eager", repeats=2, warmup=0)
    table, reused = latency.load_or_build(path, model, blocks, spec)
    assert not reused and table["model_ms"] > 0
    for name, entry in table["blocks"].items():
        h = blocks[name]["hidden_channels"]
        assert list(entry["ms"]) == latency.width_grid(h, min_kept(h), 64) and min(entry["ms"].values()) > 0
    again, reused = latency.load_or_build(path, model, blocks, spec)
    assert reused and again["blocks"] == table["blocks"] and again["model_ms"] == table["model_ms"]
    _, reused = latency.load_or_build(
        path,
        model,
        blocks,
        latency.TableSpec(image_size=SIZE, round_to=64, runtime="eager", repeats=2, warmup=0, batch_size=2),
    )
    assert not reused
    assert read_json(path)["identity"]["batch_size"] == 2  # the new table replaced the old one


def test_onnxruntime_table_of_two_blocks(small, tmp_path):
    model, blocks = small
    two = {n: blocks[n] for n in ("features.2", "features.4")}
    spec = latency.TableSpec(image_size=SIZE, round_to=32, repeats=2, warmup=1)
    table = latency.build_table(model, two, spec)
    assert table["identity"]["runtime"] == "onnxruntime" and table["identity"]["threads"] == torch.get_num_threads()
    assert {n: list(e["ms"]) for n, e in table["blocks"].items()} == {
        "features.2": [72, 64, 32],
        "features.4": [96, 64, 32],
    }
    assert all(ms > 0 for e in table["blocks"].values() for ms in e["ms"].values())
