"""Many species: what the capture keeps per class (PER_CLASS, MAX_STATS_MEMORY_GB), int64 histogram indices,
and a compact but recoverable sample record."""

import os

import pytest
import torch

from mbv3prune import capture as C
from mbv3prune import measure
from mbv3prune.blocks import find_blocks
from mbv3prune.errors import PruneError
from tests.helpers import randomized_model

ARCH = "mobilenet_v3_small"


def _capture(per_class):
    model = randomized_model(ARCH)
    gen = torch.Generator().manual_seed(0)
    data = [(torch.randn(4, 3, 32, 32, generator=gen), torch.tensor([0, 2, 2, 1])) for _ in range(2)]
    return C.capture(model, data, find_blocks(model), num_classes=3, progress=False, per_class=per_class)[0]


def test_counts_and_off_keep_the_overall_histogram_and_per_class_means():
    full, counts, off = (_capture(mode) for mode in ("histograms", "counts", "off"))
    layers = [k[: -len("/hist_class")] for k in full if k.endswith("/hist_class")]
    assert layers and not any(k.endswith("/hist_class") for k in {**counts, **off})
    for layer in layers:
        for stats in (counts, off):
            assert stats[f"{layer}/hist"].dtype == torch.int64
            assert torch.equal(stats[f"{layer}/hist"], full[f"{layer}/hist"])
            assert torch.equal(stats[f"{layer}/n_class"], full[f"{layer}/n_class"])
        per_class = counts[f"{layer}/sum_abs_class"]
        assert per_class.shape == (3, full[f"{layer}/sum"].numel()) and f"{layer}/sum_abs_class" not in off
        torch.testing.assert_close(per_class.sum(0), full[f"{layer}/sum_abs"], rtol=1e-6, atol=1e-6)
    assert C.per_class_bytes([100], 1000, "counts") * 100 < C.per_class_bytes([100], 1000, "histograms")


def test_histogram_index_does_not_overflow_past_18000_classes():
    acc = C._Accumulator({}, 0.01, 20_000, True)
    acc.start_batch(torch.tensor([19_999]))
    assert acc._hist_rows(960).dtype == torch.int64 and acc._hist_rows(16).dtype == torch.int32
    x = torch.zeros(1, 960, 1, 1)
    x[0, -1] = 1.0  # |a| = 1: bin C.bin_index(1.0) of the last channel
    want = (19_999 * 960 + 959) * C.NUM_BINS + int(C.bin_index(torch.ones(1))[0])  # past 2**31: int32 wraps
    for totals in (C._batch_totals, C._BATCH_TOTALS):  # eager and compiled
        idx = totals(x, 0.01, acc._hist_rows(960), False, None)["idx"]
        assert idx.dtype == torch.int64 and int(idx[-1]) == want


def _cfg(**kw):
    return {"CAPTURE_POINT": "project_input", "PER_CLASS": "auto", "MAX_STATS_MEMORY_GB": 4.0, **kw}


def test_auto_falls_back_to_counts_in_one_line_and_class_aware_refuses(capsys):
    blocks = find_blocks(randomized_model(ARCH))
    assert measure.per_class_mode(_cfg(), blocks, 10) == "histograms"
    assert measure.per_class_mode(_cfg(), blocks, 10_000) == "counts"
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and "per-class histograms of 10000 classes would take" in lines[0]
    assert measure.per_class_mode(_cfg(PER_CLASS="off"), blocks, 10_000) == "off"
    with pytest.raises(PruneError, match="CLASS_AWARE=True needs per-class histograms, which PER_CLASS=auto"):
        measure.per_class_mode(_cfg(CLASS_AWARE=True), blocks, 10_000)
    with pytest.raises(PruneError, match="unknown PER_CLASS 'some'"):
        measure.per_class_mode(_cfg(PER_CLASS="some"), blocks, 10)
    with pytest.raises(PruneError, match="CLASS_AWARE=True needs per-class histograms, but s.pt has none"):
        measure.check_per_class_histograms({"CLASS_AWARE": True}, _capture("counts"), "s.pt")


def test_a_large_sample_is_recorded_by_its_rule_and_recovered(image_folder, monkeypatch):
    data = image_folder(n_train=4)
    cfg = {"DATA_DIR": data, "SEED": 0, "SAMPLES_PER_CLASS": 3, "SAMPLE_FRACTION": 0.0}
    splits, _ = measure.discover(data, seed=0)
    items = measure.sample(cfg, splits)
    monkeypatch.setattr(measure, "FILES_LISTED", 3)
    meta = {"sample": measure.sample_meta(cfg, items)}
    assert "files" not in meta["sample"] and meta["sample"]["images"] == len(items) == 9
    assert measure.sample_items(meta, data) == items
    os.remove(items[0][0])
    with pytest.raises(PruneError, match="no longer gives the 9 images"):
        measure.sample_items(meta, data)


def test_class_aware_statistics_count_every_position():
    # a per-class minimum of small sampled fractions would be biased toward sparing channels
    assert measure.hist_positions({"HIST_POSITIONS_PER_IMAGE": 4}) == 4
    assert measure.hist_positions({"HIST_POSITIONS_PER_IMAGE": 4, "CLASS_AWARE": True}) == 0
    assert measure.hist_positions({"HIST_POSITIONS_PER_IMAGE": 0}) == 0
