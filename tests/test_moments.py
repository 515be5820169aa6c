"""Tests of mbv3prune.moments: Chan-merged streamed moments, their rank merge, and the capture's moment keys."""

import copy

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mbv3prune import moments as M
from mbv3prune.activation_stats import ActivationStats
from mbv3prune.blocks import find_blocks
from mbv3prune.capture import _batch_totals, capture
from mbv3prune.reconstruct import block_fit_moments
from tests.helpers import count_host_reads, randomized_model


def _rows(n=3000, c=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, generator=gen, dtype=torch.float64) @ torch.randn(c, c, generator=gen, dtype=torch.float64)


def test_near_constant_channel_keeps_its_variance_in_float32_batches():
    gen = torch.Generator().manual_seed(1)
    exact = torch.randn(20000, 2, generator=gen, dtype=torch.float64)
    exact[:, 0] = 1e4 + exact[:, 0]  # mean / std = 1e4
    x = exact.float()
    streamed, diagonal = M.Moments(2), M.Moments(2, diagonal=True)
    for batch in x.split(256):
        streamed.add(batch)
        diagonal.add(batch)
    truth = exact.var(0, correction=0)
    assert float(streamed.cov()[0, 0]) == pytest.approx(float(truth[0]), rel=0.01)
    assert float(diagonal.cov()[0]) == pytest.approx(float(truth[0]), rel=0.01)
    today = sum(float((b**2).sum(0)[0]) for b in x.split(256)) / len(x) - float(x.double().mean(0)[0]) ** 2
    assert abs(today - float(truth[0])) > 0.1 * float(truth[0])  # float32 batch sums of a**2 lose it


def test_streamed_moments_read_nothing_back_per_batch(monkeypatch):
    z = _rows().float()
    moments = {"cov": M.Moments(6), "cross": M.Moments(6, cols=2), "diagonal": M.Moments(6, diagonal=True)}
    reads = count_host_reads(monkeypatch)
    for batch in z.split(256):
        for m in moments.values():
            m.add(batch)
    assert reads == []  # on a GPU, a count read per batch would wait for the device every time
    for kind, m in moments.items():
        assert m.rows == len(z) and int(m.n) == len(z), kind
        whole = M.Moments(6, cols=2 if kind == "cross" else None, diagonal=kind == "diagonal").add(z)
        torch.testing.assert_close(m.cov(), whole.cov(), rtol=1e-5, atol=1e-5)
        before = m.cov().clone()
        m.add(z[:0])  # an empty batch (its mean is NaN) changes nothing
        assert m.rows == len(z) and torch.equal(m.cov(), before) and bool(torch.isfinite(m.mean).all()), kind


def test_capture_channel_moments_of_a_near_constant_channel_keep_its_variance():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(40, 3, 4, 4, generator=gen)
    x[:, 0] += 1e4  # mean / std = 1e4 in channel 0
    x[:8, 0, 0, 0] += 100  # the first image's top-left value 100 std off: it is not the shift
    state = {}
    sink = M.CaptureMoments(state, {}, {})
    for batch in x.split(8):  # as the capture feeds it: deviations from a shift, from the fused batch totals
        totals = _batch_totals(batch, 0.01, None, False, sink.channel_shift("L", batch))
        sink.channel("L", batch.numel() // batch.shape[1], totals["sum"], totals["dev"], totals["sq_dev"])
    exact = x.double().transpose(0, 1).reshape(3, -1)  # the float32 values, exactly
    assert int(state["L/chan_n"]) == 40 * 16
    torch.testing.assert_close(state["L/chan_m2"] / 640, exact.var(1, correction=0), rtol=1e-5, atol=0)
    torch.testing.assert_close(state["L/chan_mean"], exact.mean(1), rtol=1e-7, atol=1e-6)


def test_add_rows_equals_the_batch_moments_merge_sampled_or_not_and_for_cross_moments():
    z = _rows().float()
    gen = torch.Generator().manual_seed(4)
    for cols in (None, 2):
        fast, slow = M.zeros(6, cols), M.zeros(6, cols)
        for chunk in z.split(500):
            picked = chunk[torch.randint(len(chunk), (64,), generator=gen)]  # a sample with the exact mean
            for rows, mean, n in ((chunk, None, None), (picked, chunk.mean(0), len(chunk))):
                M.add_rows_(*fast, rows.clone(), batch_mean=mean, batch_n=n, inplace=True)
                M.merge_(*slow, *M.batch_moments(rows, cols, mean=mean, n=len(chunk)))
        assert int(fast[0]) == int(slow[0]) == 2 * len(z)
        torch.testing.assert_close(fast[1], slow[1], rtol=1e-6, atol=1e-5)
        torch.testing.assert_close(fast[2], slow[2], rtol=1e-5, atol=1e-2)


def test_merged_parts_equal_the_whole_for_plain_cross_and_diagonal_moments():
    z = _rows()
    for kwargs in ({}, {"cols": 2}, {"diagonal": True}):
        whole = M.Moments(z.shape[1], **kwargs).add(z)
        parts = M.Moments(z.shape[1], **kwargs)
        for chunk in (z[:7], z[7:1000], z[1000:]):
            parts.add(chunk)
        assert int(parts.n) == len(z)
        assert torch.allclose(parts.mean, whole.mean, atol=1e-12)
        assert torch.allclose(parts.cov(), whole.cov(), atol=1e-10)
    cross = M.Moments(z.shape[1], cols=2).add(z).cov()
    assert torch.allclose(cross, torch.cov(z.T, correction=0)[:, -2:], atol=1e-10)


@pytest.mark.parametrize("staged", [False, True])  # the Grams added into a float32 buffer, folded in afterwards
@pytest.mark.parametrize("dim, cols", [(6, None), (300, None), (300, 40)])  # 300 > the Gram's 256-wide panels
def test_batches_merged_at_once_equal_the_float64_scatter_of_their_rows(dim, cols, staged):
    gen = torch.Generator().manual_seed(6)
    z = torch.randn(900, dim, generator=gen, dtype=torch.float64) + 50 * torch.rand(dim, generator=gen)  # offset
    n, mean, m2 = M.zeros(dim, cols)
    M.add_rows_(n, mean, m2, z[:100].float())  # running moments, then three batches in two merges
    first, buffer = m2.clone(), M.staging(m2, z.float()) if staged else None
    M.merge_rows_(n, mean, m2, [M.centred(chunk.float()) for chunk in (z[100:107], z[107:500])], buffer)
    M.merge_rows_(n, mean, m2, [M.centred(z[500:].float())], buffer)
    if staged:
        assert torch.equal(m2, first)  # the Grams wait in the buffer until the fold
        M.fold_(m2, buffer)
        assert not bool(buffer.any())
    truth = (z - z.mean(0)).T @ (z - z.mean(0))[:, dim - (cols or dim) :]
    assert int(n) == 900
    torch.testing.assert_close(mean, z.mean(0), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(m2, truth, rtol=1e-5, atol=1e-5 * len(z))  # unit variances: a diagonal of 900
    if dim > 256 and cols is None:  # both triangles from the same panels
        torch.testing.assert_close(m2, m2.T, rtol=1e-12, atol=0)


def test_the_rounding_of_a_batch_centre_to_float32_is_taken_back():
    gen = torch.Generator().manual_seed(8)
    z = (1e4 + 0.01 * torch.randn(4000, 3, generator=gen, dtype=torch.float64)).float()  # mean / std = 1e6
    exact = z.double()
    n, mean, m2 = M.zeros(3)
    for chunk in exact.split(1000):  # the exact float64 batch mean: 1e4 rounds to float32 within ~5e-4 = std / 20
        M.add_rows_(n, mean, m2, chunk.float(), batch_mean=chunk.mean(0), batch_n=len(chunk))
    truth = (exact - exact.mean(0)).T @ (exact - exact.mean(0))
    torch.testing.assert_close(m2, truth, rtol=2e-4, atol=0)  # uncorrected (or the wrong sign): off by ~0.5%


def test_capture_covariances_do_not_depend_on_when_the_waiting_rows_are_merged_or_folded(monkeypatch):
    model = randomized_model("mobilenet_v3_small")
    gen = torch.Generator().manual_seed(7)
    batches = [(torch.randn(4, 3, 32, 32, generator=gen), torch.tensor([0, 0, 1, 1])) for _ in range(5)]
    kw = dict(num_classes=2, progress=False, second_moments=True, histograms=False)
    waited, _ = capture(model, batches, find_blocks(model), **kw)
    monkeypatch.setattr(M.CaptureMoments, "FLUSH_ROWS", 1)  # merged at every batch, folded at the end
    at_once, _ = capture(model, batches, find_blocks(model), **kw)
    monkeypatch.setattr(M.CaptureMoments, "FOLD_EVERY", 2)  # and folded into float64 every other batch
    folded, _ = capture(model, batches, find_blocks(model), **kw)
    for key in M.capture_keys(find_blocks(model), {}):  # float32 Grams summed in another grouping: rounding
        scale = float(at_once[key].abs().max()) if at_once[key].is_floating_point() else 0
        torch.testing.assert_close(waited[key], at_once[key], rtol=1e-5, atol=1e-6 * scale, msg=key)
        torch.testing.assert_close(folded[key], at_once[key], rtol=1e-5, atol=1e-6 * scale, msg=key)


def test_positions_sampled_per_image_give_an_unbiased_scatter_and_all_positions_when_few():
    gen = torch.Generator().manual_seed(3)
    shift = torch.arange(6.0).view(6, 1, 1, 1)  # images differ: each is a stratum of its own distribution
    x = torch.randn(6, 4, 5, 6, generator=gen) * (1 + shift) + shift  # [B, C, H, W]: 30 positions per image
    truth = M.batch_moments(M.rows_of(x))[2]
    draws = torch.stack(
        [M.batch_moments(r, mean=m, n=k)[2] for m, r, k in (M.sampled_rows(x, 5, gen) for _ in range(400))]
    )
    spread = draws.std(0) / 400**0.5
    assert bool(((draws.mean(0) - truth).abs() <= 4 * spread + 1e-6).all())  # mean of 400 draws within 4 sigma
    assert not torch.allclose(draws[0], truth, rtol=0.05)  # one draw is an estimate, not the scatter itself
    mean, rows, n = M.sampled_rows(x, 5, gen)
    assert n == 180 and rows.shape == (30, 4) and torch.allclose(mean.double(), M.rows_of(x).double().mean(0))
    for i, row in enumerate(rows):  # rows 5 i .. 5 i + 4 are positions of image i
        assert bool((x[i // 5].flatten(1).T == row).all(1).any())
    for per_image in (None, 0, 30, 31):  # every position: no estimator, the rows themselves
        mean, rows, n = M.sampled_rows(x, per_image, gen)
        assert mean is None and n == 180 and torch.equal(rows, M.rows_of(x))
    pooled = torch.randn(8, 4, generator=gen)  # [images, C]: one row per image, nothing to sample
    assert torch.equal(M.sampled_rows(pooled, 1, gen)[1], pooled)


def _rank_merge(rank, world, path, parts, out):
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=world)
    try:
        mom = M.Moments(parts[rank].shape[1]).add(parts[rank]).all_reduce()
        if rank == 0:
            out.put((int(mom.n), mom.rows, mom.mean.clone(), mom.cov().clone()))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="no gloo backend")
def test_two_ranks_merge_to_one_process_moments(tmp_path):
    z = _rows(seed=4) + 50.0
    parts = [z[:1234], z[1234:]]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_rank_merge, args=(r, 2, str(tmp_path / "store"), parts, out)) for r in range(2)]
    for p in procs:
        p.start()
    n, rows, mean, cov = out.get(timeout=120)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    whole = M.Moments(z.shape[1]).add(z)
    assert n == rows == len(z)  # the host count follows the merge too
    assert torch.allclose(mean, whole.mean, atol=1e-10) and torch.allclose(cov, whole.cov(), atol=1e-9)


def test_capture_moments_match_a_direct_measurement_and_resume():
    model = randomized_model("mobilenet_v3_large", 0, 32).double()
    blocks = find_blocks(model)
    gen = torch.Generator().manual_seed(5)
    batches = [
        (torch.randn(4, 3, 32, 32, generator=gen, dtype=torch.float64), torch.zeros(4, dtype=torch.int64))
        for _ in range(2)
    ]
    stats, layers = capture(model, batches, blocks, histograms=False, progress=False, second_moments=True)
    block = next(b for b, r in blocks.items() if r.get("se_fc1") and "expand" in r)
    images = [b for b, _ in batches]
    for kind in ("project", "se"):
        n, mean, cov = ActivationStats(stats).block_moments(block, kind)
        direct = block_fit_moments(model, model, images, block, blocks[block], kind)
        assert torch.allclose(mean, direct.mean_x, atol=1e-5) and torch.allclose(cov, direct.cov_yy, atol=1e-5)
    layer = blocks[block]["project"]
    _, mean, var = ActivationStats(stats).moments(f"{layer}/chan")
    assert torch.allclose(mean, stats[f"{layer}/sum"] / stats[f"{layer}/n"])
    assert torch.allclose(var, ActivationStats(stats).block_moments(block)[2].diagonal(), atol=1e-5)
    first, _ = capture(model, batches[:1], blocks, histograms=False, progress=False, second_moments=True)
    resumed, _ = capture(
        model, batches[1:], blocks, histograms=False, progress=False, second_moments=True, state=copy.deepcopy(first)
    )
    assert torch.allclose(resumed[f"{block}/cov_m2"], stats[f"{block}/cov_m2"], atol=1e-6)
    sub, _ = capture(
        model, batches, blocks, histograms=False, progress=False, second_moments=True, positions_per_image=2
    )
    assert torch.allclose(sub[f"{block}/cov_mean"], stats[f"{block}/cov_mean"], rtol=1e-6, atol=1e-7)  # all positions
    assert not torch.equal(sub[f"{block}/cov_m2"], stats[f"{block}/cov_m2"])


def test_reading_a_capture_without_second_moments_is_refused_naming_the_key():
    from mbv3prune.errors import PruneError

    with pytest.raises(PruneError, match="features.4/cov_n.*SECOND_MOMENTS"):
        ActivationStats({}).block_moments("features.4")


@pytest.mark.parametrize("key", ["COV_POSITIONS_PER_IMAGE", "HIST_POSITIONS_PER_IMAGE"])
def test_statistics_sampled_at_other_positions_are_stale_and_negative_positions_refused(tmp_path, key):
    from mbv3prune import measure
    from mbv3prune.artifacts import write_json
    from mbv3prune.errors import PruneError

    (tmp_path / "model.pt").write_bytes(b"weights")
    cfg = {"DATA_DIR": str(tmp_path), "CAPTURE_POINT": "project_input", "IMAGE_SIZE": 32, "SECOND_MOMENTS": True}
    identity = lambda value: measure.identity({**cfg, key: value}, str(tmp_path / "model.pt"), [])  # noqa: E731
    (tmp_path / measure.STATS_PT).write_bytes(b"")
    write_json(str(tmp_path / measure.STATS_JSON), {"identity": identity(4)})
    assert measure.stale_reason(str(tmp_path), identity(4)) is None
    for asked in (0, None):  # every position asked for: 4-per-image statistics must not be re-used
        assert key.lower().replace("_", " ") in measure.stale_reason(str(tmp_path), identity(asked))
    write_json(str(tmp_path / measure.STATS_JSON), {"identity": identity(0)})
    assert measure.stale_reason(str(tmp_path), identity(4)) is None  # every position counted: fits a sample
    with pytest.raises(PruneError, match=f"{key}=-1"):
        measure.check_positions({key: -1})


def test_a_wide_capture_covariance_staged_and_folded_equals_the_float64_scatter(monkeypatch):
    monkeypatch.setattr(M.CaptureMoments, "FLUSH_ROWS", 100)  # a merge every other batch of 64 rows
    monkeypatch.setattr(M.CaptureMoments, "FOLD_EVERY", 2)  # folded mid-stream and by the final flush
    gen = torch.Generator().manual_seed(9)
    z = torch.randn(64 * 7, 300, generator=gen, dtype=torch.float64) + 20 * torch.rand(300, generator=gen)
    state = {}
    sink = M.CaptureMoments(state, {}, {})
    for batch in z.float().split(64):  # 300 wide: the Grams' panels, then their mirror at the fold
        sink._add("B/cov", M.centred(batch))
        sink.end_batch()
    sink.flush()
    truth = (z - z.mean(0)).T @ (z - z.mean(0))
    assert int(state["B/cov_n"]) == len(z) and not bool(sink.staged["B/cov"][0].any())
    torch.testing.assert_close(state["B/cov_m2"], truth, rtol=1e-5, atol=1e-5 * len(z))
    torch.testing.assert_close(state["B/cov_m2"], state["B/cov_m2"].T, rtol=0, atol=0)
