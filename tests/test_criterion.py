"""The Criterion object with SCORE=obs and output units: joint choice, its links to fluctuation, its refusals."""

from types import SimpleNamespace

import pytest
import torch

from mbv3prune import latency, models, pruning, scores
from mbv3prune.blocks import find_blocks
from mbv3prune.criterion import Criterion
from mbv3prune.errors import PruneError
from mbv3prune.experiment import recover
from tests.helpers import randomized_model

BLOCK = "features.4"  # Small: an expanded block with SE


def moment_stats(roles, cov, block=BLOCK, mean=None, var_layer=True):
    """Capture-format second moments (n, mean, M2) of a block's project input with covariance ``cov``."""
    c, n = cov.shape[0], 1000
    mean = torch.zeros(c, dtype=torch.float64) if mean is None else mean
    stats = {f"{block}/cov_n": torch.tensor(n), f"{block}/cov_mean": mean, f"{block}/cov_m2": cov * n}
    if var_layer:  # the per-channel view the magnitude scores read
        layer = roles["project"]
        stats.update(
            {
                f"{layer}/n": torch.tensor(n),
                f"{layer}/sum": mean * n,
                f"{layer}/sum_abs": mean.abs() * n,
                f"{layer}/sum_sq": (cov.diagonal() + mean**2) * n,
            }
        )
    return stats


@pytest.fixture(scope="module")
def small():
    model = randomized_model("mobilenet_v3_small")
    return model, find_blocks(model)


def test_obs_with_a_diagonal_covariance_ranks_as_fluctuation_squared_in_output_units(small):
    model, blocks = small
    roles = blocks[BLOCK]
    var = torch.rand(roles["hidden_channels"], generator=torch.Generator().manual_seed(0), dtype=torch.float64) + 0.1
    stats = moment_stats(roles, torch.diag(var))
    obs = Criterion("obs", 1.0, ridge=0.0, min_keep_ratio=0.0, round_to=1)
    order = obs.obs(stats, BLOCK, roles, model).order
    fluct = scores.channel_score(
        stats,
        roles["project"],
        "fluctuation",
        consumer=scores.consumer_weight(model, roles),
        scale=scores.output_scale(model, roles),
    )
    expected = torch.argsort(fluct**2, stable=True).tolist()
    assert order == expected[: len(order)]
    via_criterion = Criterion("fluctuation", 1.0, output_units=True).values(stats, roles, roles["project"], model)
    torch.testing.assert_close(via_criterion, fluct)


def test_obs_removes_one_of_two_duplicates_where_magnitude_removes_the_small_channel(small):
    model, blocks = small
    roles = blocks[BLOCK]
    c = roles["hidden_channels"]
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(4000, c, generator=gen, dtype=torch.float64)
    base[:, 1] = base[:, 0]  # channels 0 and 1 are the same feature
    base[:, 2] *= 0.05  # channel 2 is small and independent
    cov = torch.cov(base.T, correction=0)
    stats = moment_stats(roles, cov, mean=torch.ones(c, dtype=torch.float64))
    first = Criterion("obs", 1.0, ridge=1e-6).obs(stats, BLOCK, roles, model).order[0]
    assert first in (0, 1)
    layer = roles["project"]
    stats[f"{layer}/sum_abs"] = base.abs().sum(0) / base.shape[0] * 1000
    mean_abs = Criterion("mean_abs", 1.0).rank(stats, {BLOCK: roles}, {BLOCK: layer})[BLOCK]
    assert max(mean_abs)[1] == 2


def test_obs_threshold_proposes_the_greedy_prefix_within_the_allowed_error(small):
    model, blocks = small
    roles = blocks[BLOCK]
    var = torch.linspace(1e-4, 1.0, roles["hidden_channels"], dtype=torch.float64)
    stats = moment_stats(roles, torch.diag(var))
    crit = Criterion("obs", 0.05, ridge=0.0, min_keep_ratio=0.0, round_to=1)
    prun, cand = crit.candidates(stats, roles, roles["project"], model, BLOCK)
    result = crit.obs(stats, BLOCK, roles, model)
    rel = result.costs.cumsum(0) / result.variance
    assert sorted(torch.nonzero(cand).flatten().tolist()) == sorted(result.order[: int((rel < 0.05).sum())])
    entry = crit.propose_block(stats, BLOCK, roles, roles["project"], model)
    assert set(entry["prune"]) <= set(torch.nonzero(cand).flatten().tolist())


def test_obs_is_refused_without_second_moments_or_with_class_awareness(small):
    model, blocks = small
    with pytest.raises(PruneError, match="SECOND_MOMENTS=True"):
        Criterion("obs", 0.1).obs({}, BLOCK, blocks[BLOCK], model)
    with pytest.raises(PruneError, match="CLASS_AWARE"):
        Criterion("obs", 0.1, class_aware=True)


def test_the_prune_stage_refuses_obs_with_class_awareness_or_without_moments_naming_the_file():
    plan = Criterion("deadness", 0.1).plan_fields() | {"score": "deadness"}
    cfg = {"SCORE": "obs", "CLASS_AWARE": False, "RECONSTRUCT": "sequential", "MIN_KEEP_RATIO": 0.25}
    cfg |= {"ROUND_TO": 8, "SKIP_BLOCKS": [], "PRUNE_MODE": "iterative", "SWEEP": [], "FALLBACK_TARGET": 0.0}
    moments = {"b/cov_m2": torch.eye(2)}
    run = SimpleNamespace(plan=plan, stats=moments, stats_path="runs/x/activation_stats.pt")
    assert pruning.criterion(run, cfg).score == "obs"
    with pytest.raises(PruneError, match="CLASS_AWARE"):  # in every mode (it was dropped silently in iterative)
        pruning.criterion(run, {**cfg, "CLASS_AWARE": True})
    no_moments = SimpleNamespace(plan=plan, stats={}, stats_path=run.stats_path)
    with pytest.raises(PruneError, match="SCORE=obs needs second moments, but runs/x/activation_stats.pt has none"):
        pruning.criterion(no_moments, cfg)
    with pytest.raises(PruneError, match="RECONSTRUCT=oneshot needs second moments, but runs/x/activation"):
        pruning.criterion(no_moments, {**cfg, "SCORE": "", "RECONSTRUCT": "oneshot"})
    assert pruning.criterion(no_moments, {**cfg, "SCORE": ""}).score == "deadness"  # sequential streams its own
    threshold = {**cfg, "PRUNE_MODE": "threshold"}  # obs plans' proposals are used as planned: no covariance read
    assert pruning.criterion(no_moments, threshold).score == "obs"
    with pytest.raises(PruneError, match="SCORE=obs needs second moments"):  # unless a sweep or fallback ranks
        pruning.criterion(no_moments, {**threshold, "FALLBACK_TARGET": 0.2})
    aware = Criterion("deadness", 0.1, class_aware=True).plan_fields() | {"score": "deadness"}
    kept = SimpleNamespace(plan=aware, stats=moments, stats_path=run.stats_path)
    assert pruning.criterion(kept, {**cfg, "SCORE": ""}).class_aware  # a class-aware plan stays class-aware


def test_bn_recalibrate_auto_keeps_the_statistics_only_when_val_improves(tiny_data):
    from mbv3prune import data, stage

    model = models.build_model("mobilenet_v3_small", 3).eval()
    cfg = {
        "DATA_DIR": tiny_data,
        "IMAGE_SIZE": 32,
        "BATCH_SIZE": 6,
        "NUM_WORKERS": 0,
        "SEED": 0,
        "MODEL_ARCH": "mobilenet_v3_small",
        "BN_RECALIBRATE": "auto",
        "BN_BATCHES": 2,
        "FINETUNE_EPOCHS": 0,
    }
    splits, names = data.discover(tiny_data, seed=0)
    loaders = {k: stage.loader(cfg, splits[v]) for k, v in (("eval", "val"), ("val", "val"), ("bn", "train"))}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    steps = recover(model, loaders, names, torch.device("cpu"), cfg)
    step = steps["bn_recalibrated"]
    assert step["kept"] == (step["val_top1_after"] > step["val_top1_before"])
    unchanged = all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert unchanged != step["kept"]
    with pytest.raises(PruneError, match="BN_RECALIBRATE"):
        recover(model, loaders, names, torch.device("cpu"), {**cfg, "BN_RECALIBRATE": "sometimes"})


def _latency_choice(model, blocks, stats, crit, monkeypatch, tmp_path):
    """(kind, ranking) that the pruning stage's target_latency hands the selection, on an injected table."""
    prunable = {b: r for b, r in blocks.items() if "expand" in r}
    table = {"model_ms": 10.0, "blocks": {}}
    for b, r in prunable.items():
        h = r["hidden_channels"]
        grid = latency.width_grid(h, crit.min_kept(h), crit.round_to)
        table["blocks"][b] = {"hidden": h, "ms": {w: 1.0 + w / h for w in grid}}
    seen, real = {}, latency.to_latency_target

    def spy(ranking, blocks, table, aim, min_keep_ratio, round_to, kind):
        seen.update(kind=kind, ranking=ranking)
        return real(ranking, blocks, table, aim, min_keep_ratio, round_to, kind)

    monkeypatch.setattr(latency, "load_or_build", lambda *a: (table, True))
    monkeypatch.setattr(latency, "to_latency_target", spy)
    run = SimpleNamespace(
        stats=stats,
        blocks=blocks,
        per_channel={b: 1 for b in prunable},
        layers={b: r["project"] for b, r in prunable.items()},
        model=model,
        device="cpu",
    )
    cfg = {"RUN_DIR": str(tmp_path), "LATENCY_RUNTIME": "eager", "LATENCY_BATCH": 1, "IMAGE_SIZE": 32}
    chosen, _ = pruning.to_latency_target(run, {**cfg, "LATENCY_REPEATS": 3, "LATENCY_CALIBRATE": 0}, crit, 0.2)
    assert chosen
    return seen["kind"], seen["ranking"]


def test_target_latency_ranks_magnitudes_in_output_units_as_costs_per_millisecond(small, monkeypatch, tmp_path):
    model, blocks = small
    gen, stats = torch.Generator().manual_seed(0), {}
    for b, r in blocks.items():
        if "expand" in r:
            var, mean = (torch.rand(r["hidden_channels"], generator=gen, dtype=torch.float64) + 0.1 for _ in "vm")
            stats.update(moment_stats(r, torch.diag(var), block=b, mean=mean))  # contribution reads the mean
    for score in scores.WEIGHTED:
        crit = Criterion(score, 1.0, output_units=True)
        kind, ranking = _latency_choice(model, blocks, stats, crit, monkeypatch, tmp_path)
        roles = blocks[BLOCK]
        value = crit.values(stats, roles, roles["project"], model)
        assert value.min() > 0 and value.unique().numel() == len(value)  # the square is told from the value
        assert kind == "cost" and ranking[BLOCK] == list(zip((value**2).tolist(), range(len(value))))
        kind, _ = _latency_choice(model, blocks, stats, crit.replace(output_units=False), monkeypatch, tmp_path)
        assert kind == "prunability"  # raw column norms are not comparable across blocks: ranked as target_macs does
    kind, _ = _latency_choice(model, blocks, stats, Criterion("obs", 1.0), monkeypatch, tmp_path)
    assert kind == "removal"
    with pytest.raises(PruneError, match="is not a cost"):
        Criterion("mean_abs", 1.0, output_units=True).costs(stats, blocks, {}, model)
