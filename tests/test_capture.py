"""Streaming capture: provably dead and active channels, stats against stored maps, histograms, classes, resume."""

import copy
import functools
import warnings

import pytest
import torch
import torchvision

from mbv3prune import capture as cap
from mbv3prune import fused
from mbv3prune.activation_stats import ActivationStats, deadness_from_hist, snap_threshold
from mbv3prune.artifacts import load_tensors, save_tensors
from mbv3prune.blocks import CAPTURE_POINTS, find_blocks
from mbv3prune.errors import PruneError
from tests.helpers import count_host_reads

K = 3  # classes
SIZE = 32  # px
DEAD, ACTIVE = [0, 3], [1, 5]  # channels forced dead / always active in the edited blocks
EDITED = ("features.1", "features.2", "features.5")  # Small: ReLU + SE, ReLU without SE, hardswish + SE
EDITED_LARGE = ("features.1", "features.4", "features.7", "features.11")  # + no expand; hardswish without SE


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors run fastest on one thread, which is also immune to oversubscription on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_batches(n_batches=3, batch=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(batch, 3, SIZE, SIZE, generator=gen), torch.randint(0, K, (batch,), generator=gen))
        for _ in range(n_batches)
    ]


def make_model(arch="mobilenet_v3_small", seed=0):
    """A fresh copy of: random weights, BN statistics from random images (activations of order 1), eval mode."""
    return copy.deepcopy(_calibrated_model(arch, seed))


@functools.cache
def _calibrated_model(arch, seed):
    torch.manual_seed(seed)
    model = getattr(torchvision.models, arch)(num_classes=K)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
    model.train()
    with torch.no_grad():
        for images, _ in make_batches(2, 8, seed=seed + 100):
            model(images)
    return model.eval()


def run(model, batches, **kw):
    return cap.capture(model, batches, find_blocks(model), num_classes=K, progress=False, **kw)


def no_hooks_left(model):
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def force_channels(model, edited=EDITED):
    """Depthwise BN of DEAD channels -> -10 (exactly 0 after ReLU / hardswish), of ACTIVE ones -> +5 with SE gate 1."""
    blocks = find_blocks(model)
    with torch.no_grad():
        for name in edited:
            roles = blocks[name]
            bn = model.get_submodule(roles["depthwise_bn"])
            bn.weight[DEAD + ACTIVE] = 0.0
            bn.bias[DEAD] = -10.0
            bn.bias[ACTIVE] = 5.0
            if roles["has_se"]:
                fc2 = model.get_submodule(roles["se_fc2"])
                fc2.weight[ACTIVE] = 0.0
                fc2.bias[ACTIVE] = 3.0  # hardsigmoid(3) == 1
    return blocks


@pytest.mark.parametrize("arch, edited", [("mobilenet_v3_small", EDITED), ("mobilenet_v3_large", EDITED_LARGE)])
@pytest.mark.parametrize("point", ["project_input", "activation"])
def test_forced_channels_are_exactly_dead_or_active(point, arch, edited):
    model = make_model(arch)
    blocks = force_channels(model, edited)
    stats, layers = run(model, make_batches(), capture_point=point)
    for name in edited:
        layer = next(k for k, v in layers.items() if v["block"] == name and v["proposal"])
        deadness = stats[f"{layer}/below"] / stats[f"{layer}/n"]
        assert deadness[DEAD].tolist() == [1.0, 1.0], layer
        assert deadness[ACTIVE].tolist() == [0.0, 0.0], layer
        others = [c for c in range(blocks[name]["hidden_channels"]) if c not in DEAD + ACTIVE]
        assert (deadness[others] < 1).any(), "the edit must not kill the whole block"
        assert (stats[f"{layer}/neuron_below"][DEAD] == stats[f"{layer}/n_images"]).all()
        assert (stats[f"{layer}/hist"][DEAD, 1:] == 0).all(), "dead channels are exact zeros"
        assert (stats[f"{layer}/max_abs"][ACTIVE] == 5.0).all()


@pytest.mark.parametrize("name", EDITED)
def test_conv_output_does_not_see_bn_deadness(name):
    """At conv_output the depthwise conv is captured before its BN: editing that BN leaves its stats unchanged."""
    edited, batches = make_model(), make_batches()
    force_channels(edited, [name])
    ref, _ = run(make_model(), batches, capture_point="conv_output")
    got, layers = run(edited, batches, capture_point="conv_output")
    dead_there, _ = run(edited, batches, capture_point="activation")
    layer = find_blocks(edited)[name]["depthwise"]
    assert layers[layer]["proposal"]
    for stat in ("below", "sum", "hist_class"):
        assert torch.equal(got[f"{layer}/{stat}"], ref[f"{layer}/{stat}"]), (layer, stat)
    assert (got[f"{layer}/below"][DEAD] < got[f"{layer}/n"]).all()
    act = find_blocks(edited)[name]["depthwise_act"]
    assert (dead_there[f"{act}/below"][DEAD] == dead_there[f"{act}/n"]).all()


def stored_maps(model, blocks, point, batches):
    """The captured tensors, kept whole (the test's independent reference), plus the pre-gate activations."""
    maps, pregate = {}, {}
    hooks = [
        (name, info["hook"], lambda x, name=name: maps.setdefault(name, []).append(x.detach().clone()))
        for name, info in cap.describe_layers(blocks, point).items()
    ]
    hooks += [
        (roles["depthwise_act"], "post", lambda x, b=b: pregate.setdefault(b, []).append(x.detach().clone()))
        for b, roles in blocks.items()
    ]
    with cap.attached_hooks(model, hooks), torch.no_grad():
        for images, _ in batches:
            model(images)
    return {k: torch.cat(v) for k, v in maps.items()}, {k: torch.cat(v) for k, v in pregate.items()}


def reference_bins(a, edges):
    """Bin of each |a| straight from the edges: edges[i] <= |a| < edges[i + 1] (overflow bin includes inf)."""
    return (torch.searchsorted(edges, a.double(), right=True) - 1).clamp(max=len(edges) - 2)


@pytest.mark.parametrize("point", CAPTURE_POINTS)
def test_stats_equal_direct_computation_on_stored_maps(point):
    model, batches = make_model(), make_batches()
    blocks = find_blocks(model)
    labels = torch.cat([y for _, y in batches])
    threshold = 0.3
    stats, _ = run(model, batches, capture_point=point, threshold=threshold)
    maps, pregate = stored_maps(model, blocks, point, batches)
    edges = stats["hist_edges"]
    for layer, x in maps.items():
        x64, a = x.double(), x.abs()
        dims = (0, 2, 3)
        assert int(stats[f"{layer}/n"]) == x[:, 0].numel()
        assert int(stats[f"{layer}/n_images"]) == len(x)
        assert torch.equal(stats[f"{layer}/below"], (a < threshold).sum(dims))
        assert torch.equal(stats[f"{layer}/neuron_below"], (a < threshold).sum(0))
        assert torch.equal(stats[f"{layer}/max_abs"], a.amax(dims))
        scale = x64.abs().sum(dims) + 1e-30
        for stat, ref in (("sum", x64.sum(dims)), ("sum_abs", x64.abs().sum(dims)), ("sum_sq", (x64**2).sum(dims))):
            err = (stats[f"{layer}/{stat}"] - ref).abs()
            assert (err <= 1e-5 * (scale if stat != "sum_sq" else ref + 1e-30)).all(), (layer, stat)
        bins = reference_bins(a, edges)
        rows = labels.view(-1, 1, 1, 1) * x.shape[1] + torch.arange(x.shape[1]).view(1, -1, 1, 1)
        ref_hist = torch.bincount((rows * cap.NUM_BINS + bins).flatten(), minlength=K * x.shape[1] * cap.NUM_BINS)
        assert torch.equal(stats[f"{layer}/hist_class"], ref_hist.view(K, x.shape[1], cap.NUM_BINS))
        assert torch.equal(stats[f"{layer}/hist"], ref_hist.view(K, x.shape[1], -1).sum(0))
        assert torch.equal(stats[f"{layer}/n_class"], torch.bincount(labels, minlength=K))
    for block, x in pregate.items():
        assert int(stats[f"{block}/pregate_n"]) == x[:, 0].numel()
        torch.testing.assert_close(
            ActivationStats(stats).pregate_mean(block, x.shape[1]), x.double().mean((0, 2, 3)), rtol=1e-5, atol=1e-6
        )


@pytest.mark.parametrize("per_class, hist_positions", [("histograms", None), ("counts", None), ("histograms", 4)])
def test_compiled_reductions_give_the_eager_capture(monkeypatch, per_class, hist_positions):
    model, batches = make_model(), make_batches(n_batches=3, batch=8)
    kw = dict(per_class=per_class, second_moments=True, positions_per_image=4, hist_positions_per_image=hist_positions)
    torch._dynamo.reset()  # a fresh recompile budget: past it dynamo would run eagerly, and this compare nothing
    compiled, _ = run(model, batches, **kw)
    assert not cap._BATCH_TOTALS.failed  # it did compile (no fallback)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0
    monkeypatch.setattr(cap, "_BATCH_TOTALS", cap._batch_totals)
    eager, _ = run(model, batches, **kw)
    assert compiled.keys() == eager.keys()
    for key, value in compiled.items():
        if value.dtype.is_floating_point:  # sums may be added in another order
            torch.testing.assert_close(value, eager[key], rtol=1e-5, atol=1e-6, msg=key)
        else:  # counts and histograms: exactly
            assert torch.equal(value, eager[key]), key


def test_a_failed_compile_warns_once_and_runs_eagerly():
    def double(x):
        return 2 * x

    def broken(*args):
        raise RuntimeError("no C++ compiler found\nsecond line")

    fn = fused.compiled(double)
    fn.compiled = broken
    with pytest.warns(UserWarning, match=r"double \(RuntimeError: no C\+\+ compiler found\): it runs eagerly"):
        assert torch.equal(fn(torch.ones(2)), torch.full((2,), 2.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(fn(torch.ones(3)), torch.full((3,), 2.0))  # eager from now on, silently
    assert fn.failed == {"cpu"}


def test_running_out_of_memory_in_a_compiled_call_is_raised_not_taken_for_a_compiler_failure():
    def oom(*args):
        raise torch.OutOfMemoryError("out of memory")

    fn = fused.compiled(lambda x: x)
    fn.compiled = oom
    with pytest.raises(torch.OutOfMemoryError):
        fn(torch.ones(2))
    assert not fn.failed


def test_sampled_histograms_count_the_drawn_positions_and_the_other_stats_every_position():
    model, batches = make_model(), make_batches()
    blocks, per_image = find_blocks(model), 4
    sampled, _ = run(model, batches, hist_positions_per_image=per_image)
    exact, _ = run(model, batches)
    maps, _ = stored_maps(model, blocks, "project_input", batches)
    edges, gen = sampled["hist_edges"], torch.Generator().manual_seed(cap._HIST_SEED_OFFSET)  # the draws, in order
    want = {layer: torch.zeros_like(sampled[f"{layer}/hist_class"]) for layer in maps}
    for i, (_, labels) in enumerate(batches):
        order = torch.argsort(labels, stable=True)  # the capture groups a batch by class
        for layer, x in maps.items():  # forward order, as the hooks run
            x = x[i * len(labels) : (i + 1) * len(labels)][order].flatten(2)
            b, c, hw = x.shape
            if hw > per_image:
                x = x.gather(2, torch.randint(hw, (b, per_image), generator=gen)[:, None, :].expand(b, c, -1))
            rows = labels[order].view(-1, 1, 1) * c + torch.arange(c).view(1, -1, 1)
            counts = torch.bincount((rows * cap.NUM_BINS + reference_bins(x.abs(), edges)).flatten(), minlength=0)
            want[layer].view(-1)[: counts.numel()] += counts
    sampled_somewhere = False
    for layer, x in maps.items():
        hw = x.shape[2] * x.shape[3]
        assert torch.equal(sampled[f"{layer}/hist_class"], want[layer]), layer
        assert (sampled[f"{layer}/hist"].sum(1) == len(x) * min(hw, per_image)).all(), layer
        sampled_somewhere |= hw > per_image
    assert sampled_somewhere
    for key, value in exact.items():  # below, neuron_below, sums, max |a|, per-class image counts: every position
        if not key.endswith(("/hist", "/hist_class")):
            assert torch.equal(sampled[key], value), key


def test_sampled_histogram_fractions_are_unbiased():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(6, 3, 8, 8, generator=gen) * torch.linspace(0.01, 3, 64).view(1, 1, 8, 8)  # position-dependent
    edges, rows = cap.hist_edges(), torch.zeros(6, dtype=torch.int32)  # one histogram: every image in row 0

    def fractions(positions):
        idx = cap._batch_totals(x, 0.1, rows, False, None, positions)["idx"]
        hist = torch.bincount(idx.long(), minlength=3 * cap.NUM_BINS).view(3, -1).double()
        return deadness_from_hist(hist, edges, 2.0**-1)

    draws = torch.stack([fractions(torch.randint(64, (6, 4), generator=gen)) for _ in range(2000)])
    exact = fractions(None)
    assert ((draws.mean(0) - exact).abs() < 4 * draws.std(0) / 2000**0.5 + 1e-12).all(), (draws.mean(0), exact)


def test_bin_index_is_exact_at_every_edge():
    edges = cap.hist_edges()
    inner = edges[1:-1].float()
    below_edges = torch.nextafter(inner, torch.zeros_like(inner))
    spread = torch.logspace(-45, 38, 5001).float()
    values = torch.cat([torch.zeros(1), inner, below_edges, spread, torch.tensor([torch.finfo(torch.float32).max])])
    assert torch.equal(cap.bin_index(values).long(), reference_bins(values, edges))
    assert cap.bin_index(torch.tensor([0.0, 1e-30, 5e-7, 1e-6, 1.0, 2e3, float("inf")])).tolist() == [
        0,
        1,
        1,
        2,
        reference_bins(torch.tensor([1.0]), edges).item(),
        cap.NUM_BINS - 1,
        cap.NUM_BINS - 1,
    ]
    assert len(edges) == cap.NUM_BINS + 1 and bool((edges[1:] > edges[:-1]).all())
    assert edges[2] < 1.01e-6 and edges[-2] > 0.99e3


def test_hist_deadness_equals_below_at_an_edge_and_rounds_down_between():
    model, batches = make_model(), make_batches()
    edges = cap.hist_edges()
    edge = float(edges[cap.NUM_BINS - 45])  # an edge in the middle of the activations' range
    stats, layers = run(model, batches, threshold=edge)
    for layer in layers:
        direct = stats[f"{layer}/below"] / stats[f"{layer}/n"].double()
        assert torch.equal(deadness_from_hist(stats[f"{layer}/hist"], edges, edge), direct)
    between = edge * 1.1
    assert snap_threshold(between, edges) == edge
    fresh, _ = run(model, batches, threshold=between)
    for layer in layers:
        from_hist = deadness_from_hist(stats[f"{layer}/hist"], edges, between)
        assert torch.equal(from_hist, stats[f"{layer}/below"] / stats[f"{layer}/n"].double())
        assert (from_hist <= fresh[f"{layer}/below"] / fresh[f"{layer}/n"].double()).all()


def test_class_deadness_from_hist_equals_a_fresh_capture_of_that_class():
    model, batches = make_model(), make_batches(4, 6)
    edges = cap.hist_edges()
    new_threshold = float(edges[cap.NUM_BINS - 40])
    stats, layers = run(model, batches, threshold=float(edges[cap.NUM_BINS - 50]))
    images, labels = torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])
    for k in range(K):
        only_k = [(images[labels == k], labels[labels == k])]
        fresh, _ = run(model, only_k, threshold=new_threshold)
        for layer in layers:
            per_class = deadness_from_hist(stats[f"{layer}/hist_class"][k], edges, new_threshold)
            assert torch.equal(per_class, fresh[f"{layer}/below"] / fresh[f"{layer}/n"].double()), (layer, k)


def failing_batches(good, exc):
    yield good
    raise exc


@pytest.mark.parametrize("failure", ["iterator", "image size", "nan"])
def test_hooks_are_removed_when_the_pass_raises(failure):
    model = make_model().train()
    good = make_batches(1)[0]
    if failure == "iterator":
        batches, expected = failing_batches(good, RuntimeError("loader died")), RuntimeError
    elif failure == "image size":  # raised inside a hook, in the middle of the forward pass
        batches, expected = [good, (torch.randn(4, 3, 2 * SIZE, 2 * SIZE), good[1])], PruneError
    else:
        batches, expected = [good, (torch.full((4, 3, SIZE, SIZE), float("nan")), good[1])], PruneError
    with pytest.raises(expected):
        run(model, batches)
    assert no_hooks_left(model)
    assert model.training, "train/eval mode is restored"


def test_nan_in_the_input_names_the_first_layer():
    model = make_model()
    images, labels = make_batches(1)[0]
    images[1, 0, 3, 3] = float("nan")
    first = next(iter(cap.describe_layers(find_blocks(model))))
    with pytest.raises(PruneError, match=rf"^layer {first}: NaN or inf"):
        run(model, [(images, labels)])


def test_nan_inside_the_network_names_the_layer_where_it_appears():
    model = make_model()
    blocks = find_blocks(model)
    with torch.no_grad():
        model.get_submodule(blocks["features.5"]["depthwise_bn"]).running_var[2] = -1.0  # sqrt(<0) = NaN
    for point in ("project_input", "activation"):
        layers = cap.describe_layers(blocks, point)
        layer = next(k for k, v in layers.items() if v["block"] == "features.5" and v["proposal"])
        with pytest.raises(PruneError, match=rf"^layer {layer}: NaN or inf"):
            run(model, make_batches(1), capture_point=point)


def assert_same_stats(a, b):
    assert a.keys() == b.keys()
    for key in a:
        if a[key].dtype.is_floating_point:
            torch.testing.assert_close(a[key], b[key], rtol=1e-12, atol=0, msg=key)
        else:
            assert torch.equal(a[key], b[key]), key


def test_resume_from_a_saved_half_equals_one_whole_run(tmp_path):
    model, batches = make_model(), make_batches(4)
    whole, _ = run(model, batches)
    first, _ = run(model, batches[:2])
    save_tensors(tmp_path / "half.pt", first)
    loaded = load_tensors(tmp_path / "half.pt")
    kept = {k: v.clone() for k, v in loaded.items()}
    resumed, _ = run(model, batches[2:], state=loaded)
    assert_same_stats(resumed, whole)
    assert_same_stats(loaded, kept)  # the given state is not modified
    assert int(resumed["n_batches"]) == 4


def test_on_batch_checkpoint_resumes_to_the_same_result():
    model, batches = make_model(), make_batches(4)
    seen, checkpoints = [], {}

    def on_batch(i, state):
        seen.append(i)
        if i == 3:
            checkpoints[i] = cap.finalize(state)

    whole, _ = run(model, batches, on_batch=on_batch)
    assert seen == [1, 2, 3, 4]
    resumed, _ = run(model, batches[3:], state=checkpoints[3])
    assert_same_stats(resumed, whole)


def test_on_batch_runs_every_nth_batch_on_a_state_with_every_moment_row_merged():
    model, batches = make_model(), make_batches(5)
    kw = dict(second_moments=True, per_class="off")
    seen, checkpoints = [], {}

    def on_batch(i, state):
        seen.append(i)
        checkpoints[i] = cap.finalize(state)

    whole, _ = run(model, batches, on_batch=on_batch, on_batch_every=2, **kw)
    assert seen == [2, 4]
    assert int(checkpoints[4]["features.4/cov_n"]) == int(checkpoints[4]["features.4.block.3.0/n"])  # none waits
    resumed, _ = run(model, batches[4:], state=checkpoints[4], **kw)
    assert_same_stats(resumed, whole)


def test_a_capture_reads_tensors_back_once_per_batch_not_per_layer(monkeypatch):
    """On a GPU every int(), bool() or .item() of a tensor waits for the device. A capture reads each running
    count once (a resumed state's), then only the per-batch NaN / inf check: counted on the CPU, where a read
    is the same call."""
    model, batches = make_model(), make_batches(6)
    kw = dict(second_moments=True, positions_per_image=2, hist_positions_per_image=2)
    run(model, batches[:1], **kw)  # compiled before counting
    reads, counted = count_host_reads(monkeypatch), {}
    for n in (2, 6):
        reads.clear()
        run(model, batches[:n], **kw)
        counted[n] = len(reads)
    assert counted[6] - counted[2] == 4, counted  # one per batch: the finiteness check


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_cuda_capture_waits_for_the_device_once_per_batch():
    """The waits count_host_reads cannot see (blocking copies, bincount's maximum, boolean-mask indexing)
    torch's sync debug mode reports. With the labels on the CPU, as the stages pass them, one remains per batch."""
    model, batches = make_model().cuda(), make_batches(6)
    kw = dict(second_moments=True, positions_per_image=2, hist_positions_per_image=2, device="cuda")
    run(model, batches[:1], **kw)  # compiled before counting
    counted = {}
    for n in (2, 6):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                run(model, batches[:n], **kw)
            finally:
                torch.cuda.set_sync_debug_mode(0)
        counted[n] = sum("synchronizing" in str(w.message) for w in caught)
    assert counted[6] - counted[2] == 4, counted  # the finiteness check


def test_hist_counts_move_to_int64_before_int32_could_overflow(monkeypatch):
    model, batches = make_model(), make_batches(3)
    ref, _ = run(model, batches)
    layer = "features.1.block.2.0"
    per_batch = int(ref[f"{layer}/n"]) // len(batches)
    monkeypatch.setattr(cap, "_INT32_MAX", per_batch * 3 // 2)  # as if a bin could pass 2**31 - 1 in batch 2
    dtypes = []
    got, _ = run(model, batches, on_batch=lambda i, s: dtypes.append(s[f"{layer}/hist_class"].dtype))
    assert dtypes == [torch.int32, torch.int64, torch.int64]
    assert_same_stats(got, ref)


def test_resume_refuses_a_state_from_other_settings():
    model, batches = make_model(), make_batches(1)
    stats, _ = run(model, batches)
    with pytest.raises(PruneError, match="threshold"):
        run(model, batches, state=stats, threshold=0.5)
    with pytest.raises(PruneError, match="key"):
        run(model, batches, state=stats, capture_point="activation")
    with pytest.raises(PruneError, match="key"):
        run(model, batches, state=stats, histograms=False)


def test_state_size_does_not_depend_on_the_number_of_images():
    model = make_model()
    one, _ = run(model, make_batches(1))
    many, _ = run(model, make_batches(5, 6))
    assert {k: (v.shape, v.dtype) for k, v in one.items()} == {k: (v.shape, v.dtype) for k, v in many.items()}


def test_without_histograms_the_other_stats_are_unchanged():
    model, batches = make_model(), make_batches()
    full, _ = run(model, batches)
    lean, _ = run(model, batches, histograms=False)
    assert not any(k.endswith(("/hist", "/hist_class")) for k in lean)
    assert_same_stats(lean, {k: v for k, v in full.items() if k in lean})


def test_stats_load_with_weights_only(tmp_path):
    model = make_model()
    stats, layers = run(model, make_batches(1))
    torch.save(stats, tmp_path / "stats.pt")
    assert_same_stats(torch.load(tmp_path / "stats.pt", weights_only=True), stats)
    assert all(isinstance(v, torch.Tensor) for v in stats.values())
    assert all(isinstance(v, dict) and isinstance(v["proposal"], bool) for v in layers.values())


@pytest.mark.parametrize("arch", ["mobilenet_v3_small", "mobilenet_v3_large"])
@pytest.mark.parametrize("point", CAPTURE_POINTS)
def test_one_proposal_layer_per_block(arch, point):
    blocks = find_blocks(getattr(torchvision.models, arch)())
    layers = cap.describe_layers(blocks, point)
    for block, roles in blocks.items():
        mine = {k: v for k, v in layers.items() if v["block"] == block}
        assert sum(v["proposal"] for v in mine.values()) == 1
        assert len(mine) == (1 if point == "project_input" or "expand" not in roles else 2)


def test_bad_inputs_are_refused_with_a_message():
    model, batches = make_model(), make_batches(1)
    with pytest.raises(PruneError, match="label 3 is outside"):
        run(model, [(batches[0][0], torch.tensor([0, 1, 2, 3]))])
    with pytest.raises(PruneError, match="CAPTURE_POINT"):
        run(model, batches, capture_point="output")
    with pytest.raises(PruneError, match="THRESHOLD"):
        run(model, batches, threshold=0)
    with pytest.raises(PruneError, match="no activations"):
        run(model, [])
    assert no_hooks_left(model)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_capture_equals_cpu_capture():
    model, batches = make_model(), make_batches()
    on_cpu, _ = run(model, batches)
    on_gpu, _ = run(model.cuda(), batches, device="cuda")
    assert on_gpu.keys() == on_cpu.keys()
    for key in on_cpu:
        assert on_gpu[key].device.type == "cpu" and on_gpu[key].dtype == on_cpu[key].dtype, key
        if key.endswith(("/n", "/n_images", "/n_class", "/pregate_n", "n_batches", "hist_edges", "threshold")):
            assert torch.equal(on_gpu[key], on_cpu[key]), key  # what was counted, not where values fell
        elif on_cpu[key].dtype.is_floating_point:
            torch.testing.assert_close(on_gpu[key], on_cpu[key], rtol=1e-4, atol=1e-5, msg=key)
        else:  # below-threshold counts and histograms: GPU rounding may move a few values across an edge
            moved = float((on_gpu[key] - on_cpu[key]).abs().sum())
            assert moved <= 1e-3 * max(1, float(on_cpu[key].abs().sum())), f"{key}: {moved} counts moved"
