"""Tests of floors and rounding (selection), each score (scores), proposals and class awareness (criterion), and
the plan file's writing and validation (plan).

Statistics are computed here, in the capture format, from small synthetic activation tensors, so every
expected value is counted directly from the activations rather than written down.
"""

import copy
import json
import math
import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mbv3prune import artifacts, models, plan, scores, selection
from mbv3prune.activation_stats import ActivationStats
from mbv3prune.blocks import capture_layer, find_blocks
from mbv3prune.criterion import Criterion
from mbv3prune.errors import PruneError

ARCH, NUM_CLASSES = "mobilenet_v3_small", 4
CAPTURED = 0.05  # the THRESHOLD the synthetic "below" counts are taken at (between two histogram edges)
EDGES = torch.tensor(
    [0.0, 1e-6, *torch.logspace(-3, 1, 25, dtype=torch.float64).tolist(), math.inf], dtype=torch.float64
)
SETTINGS = dict(
    threshold=CAPTURED, deadness_threshold=0.9, min_keep_ratio=0.25, round_to=8, class_aware=False, min_class_samples=2
)


def propose(stats, blocks, layers, score="deadness", weights=None, **settings):
    """The proposals of the Criterion with ``settings`` (the plan stage's call)."""
    return Criterion(score=score, **settings).propose(stats, blocks, layers, weights)


# --- synthetic statistics in the capture format ---------------------------------------------------------


def _hist(mag):
    """Per channel histogram [C, NB] of |a| [N, C, H, W] over EDGES (bin 0: below EDGES[1])."""
    bins = torch.bucketize(mag, EDGES, right=True) - 1
    flat = bins.transpose(0, 1).reshape(mag.shape[1], -1)
    hist = torch.zeros(mag.shape[1], EDGES.numel() - 1, dtype=torch.int64)
    return hist.scatter_add_(1, flat, torch.ones_like(flat))


def layer_stats(layer, acts, labels, threshold=CAPTURED):
    """The capture-format entries of one layer from its full activations [N, C, H, W]."""
    mag = acts.abs().double()
    n, _, h, w = acts.shape
    return {
        f"{layer}/n": torch.tensor(n * h * w),
        f"{layer}/n_images": torch.tensor(n),
        f"{layer}/below": (mag < threshold).sum((0, 2, 3)),
        f"{layer}/neuron_below": (mag < threshold).sum(0),
        f"{layer}/sum": acts.double().sum((0, 2, 3)),
        f"{layer}/sum_abs": mag.sum((0, 2, 3)),
        f"{layer}/sum_sq": (mag**2).sum((0, 2, 3)),
        f"{layer}/max_abs": mag.amax((0, 2, 3)),
        f"{layer}/hist": _hist(mag),
        f"{layer}/hist_class": torch.stack([_hist(mag[labels == k]) for k in range(NUM_CLASSES)]),
        f"{layer}/n_class": torch.bincount(labels, minlength=NUM_CLASSES),
    }


def stats_from(acts, labels):
    """Capture-format stats from {layer: activations}."""
    stats = {"hist_edges": EDGES, "threshold": torch.tensor(CAPTURED, dtype=torch.float64)}
    for layer, a in acts.items():
        stats.update(layer_stats(layer, a, labels))
    return stats


def synthetic_acts(channels, seed, n_images=8, size=2):
    """ReLU-like activations with a random half of the channels exactly zero."""
    gen = torch.Generator().manual_seed(seed)
    acts = torch.randn(n_images, channels, size, size, generator=gen).clamp_min(0)
    dead = torch.randperm(channels, generator=gen)[: channels // 2]
    acts[:, dead] = 0
    return acts


@pytest.fixture(scope="module")
def small():
    """A tiny MobileNetV3-Small with its blocks, proposal layers, widths and synthetic stats."""
    torch.manual_seed(0)
    model = models.build_model(ARCH, NUM_CLASSES)
    blocks = find_blocks(model)
    layers = {b: capture_layer(r, "project_input") for b, r in blocks.items()}
    labels = torch.arange(8) % NUM_CLASSES
    acts = {layers[b]: synthetic_acts(r["hidden_channels"], seed=i) for i, (b, r) in enumerate(blocks.items())}
    return {
        "model": model,
        "blocks": blocks,
        "layers": layers,
        "acts": acts,
        "labels": labels,
        "stats": stats_from(acts, labels),
        "widths": models.layer_widths(model),
    }


def build_plan(small, score="deadness", **overrides):
    """Propose and make the plan dict for ``small`` with SETTINGS (and overrides)."""
    opts = {**SETTINGS, **overrides}
    weights = small["model"].state_dict()
    proposals = propose(small["stats"], small["blocks"], small["layers"], score, weights=weights, **opts)
    return plan.make_plan(
        proposals,
        small["stats"],
        Criterion(score=score, **opts),
        arch=ARCH,
        widths=small["widths"],
        checkpoint_sha256="ab" * 32,
        capture_point="project_input",
        provenance=artifacts.provenance({"SCORE": score}),
    )


# --- floors and rounding ----------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    st.integers(1, 1200).flatmap(lambda h: st.tuples(st.just(h), st.integers(0, h))),
    st.floats(0, 1),
    st.integers(1, 64),
)
def test_keep_count_obeys_floors_and_rounds_up_minimally(hidden_cands, ratio, round_to):
    hidden, cands = hidden_cands
    kept = selection.keep_count(hidden, cands, ratio, 8, round_to)
    low = max(hidden - cands, math.ceil(round(ratio * hidden, 9)), min(8, hidden))
    assert low <= kept <= hidden
    assert kept % round_to == 0 or kept == hidden
    smallest = next((k for k in range(low, hidden + 1) if k % round_to == 0), hidden)
    assert kept == smallest


@given(st.integers(1, 7), st.floats(0, 1))
def test_narrow_block_keeps_everything(hidden, ratio):
    assert selection.keep_count(hidden, hidden, ratio, 8, 1) == hidden


@pytest.mark.parametrize("args", [(8, 9, 0.25, 8, 8), (8, -1, 0.25, 8, 8), (8, 0, 1.5, 8, 8), (8, 0, 0.25, 8, 0)])
def test_keep_count_refuses_bad_arguments(args):
    with pytest.raises(PruneError):
        selection.keep_count(*args)


# --- scores -----------------------------------------------------------------------------------------------


def test_unknown_score_lists_the_valid_ones(small):
    with pytest.raises(PruneError, match="deadness, mean_abs, contribution, fluctuation"):
        scores.prunability(small["stats"], small["layers"]["features.4"], "magnitude")


def test_prunability_orients_every_score_higher_is_more_prunable(small):
    layer, roles = small["layers"]["features.4"], small["blocks"]["features.4"]
    mag = small["acts"][layer].abs().double()
    weight = scores.consumer_weight(small["model"], roles)
    dead = scores.prunability(small["stats"], layer, "deadness", CAPTURED)
    torch.testing.assert_close(dead, (mag < CAPTURED).double().mean((0, 2, 3)))
    torch.testing.assert_close(scores.prunability(small["stats"], layer, "mean_abs"), -mag.mean((0, 2, 3)))
    contribution = mag.mean((0, 2, 3)) * torch.linalg.vector_norm(weight.double(), dim=(0, 2, 3))
    torch.testing.assert_close(
        scores.prunability(small["stats"], layer, "contribution", consumer=weight), -contribution
    )


def test_contribution_prunes_a_channel_whose_consumer_column_is_zero(small):
    roles = small["blocks"]["features.4"]
    alive = small["acts"][small["layers"]["features.4"]].abs().sum((0, 2, 3)).nonzero().flatten()
    target = int(alive[0])
    state = {k: v.clone() for k, v in small["model"].state_dict().items()}
    state[f"{roles['project']}.weight"][:, target] = 0
    proposals = propose(
        small["stats"],
        small["blocks"],
        small["layers"],
        "contribution",
        weights=state,
        **{**SETTINGS, "threshold": 1e-9, "round_to": 1},
    )
    assert target in proposals["features.4"]["prune"]


def test_contribution_without_weights_is_refused(small):
    with pytest.raises(PruneError, match="weights"):
        propose(small["stats"], small["blocks"], small["layers"], "contribution", **SETTINGS)


def test_missing_layer_is_named(small):
    stats = {k: v for k, v in small["stats"].items() if not k.startswith(small["layers"]["features.5"] + "/")}
    with pytest.raises(PruneError, match="features.5.block.3.0/"):
        propose(stats, small["blocks"], small["layers"], **SETTINGS)


def test_stats_of_another_width_are_refused(small):
    layer = small["layers"]["features.4"]
    stats = {**small["stats"], **layer_stats(layer, synthetic_acts(50, seed=3), small["labels"])}
    with pytest.raises(PruneError, match="another model"):
        propose(stats, small["blocks"], small["layers"], **SETTINGS)


# --- proposals --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("score,threshold", [("deadness", CAPTURED), ("mean_abs", 0.2), ("contribution", 0.05)])
def test_proposals_prune_only_candidates_and_respect_floors(small, score, threshold):
    weights = small["model"].state_dict()
    opts = {**SETTINGS, "threshold": threshold}
    proposals = propose(small["stats"], small["blocks"], small["layers"], score, weights=weights, **opts)
    for name, roles in small["blocks"].items():
        entry, hidden = proposals[name], roles["hidden_channels"]
        if "expand" not in roles:
            assert entry["prune"] == [] and "expand" in entry["skipped"]
            continue
        prun, cand = Criterion(score, threshold, 0.9).candidates(small["stats"], roles, small["layers"][name], weights)
        assert all(cand[i] for i in entry["prune"])
        assert entry["kept"] == hidden - len(entry["prune"]) >= selection.min_kept(hidden, 0.25)
        assert entry["kept"] % 8 == 0 or entry["kept"] == hidden
        spared = [i for i in range(hidden) if cand[i] and i not in entry["prune"]]
        if entry["prune"] and spared:
            assert min(prun[entry["prune"]]) >= max(prun[spared])


def test_some_dead_channels_are_pruned_in_every_expanded_block(small):
    proposals = propose(small["stats"], small["blocks"], small["layers"], **SETTINGS)
    assert all(proposals[b]["prune"] for b, roles in small["blocks"].items() if "expand" in roles)


def test_captures_layer_description_gives_the_same_proposals(small):
    described = {
        layer: {"block": b, "proposal": True, "channels": small["blocks"][b]["hidden_channels"]}
        for b, layer in small["layers"].items()
    }
    described["features.4.block.0.2"] = {"block": "features.4", "proposal": False, "channels": 96}
    assert propose(small["stats"], small["blocks"], described, **SETTINGS) == propose(
        small["stats"], small["blocks"], small["layers"], **SETTINGS
    )


def test_skip_blocks_are_listed_with_a_reason(small):
    proposals = propose(small["stats"], small["blocks"], small["layers"], skip_blocks=["features.4"], **SETTINGS)
    assert proposals["features.4"]["prune"] == [] and "SKIP_BLOCKS" in proposals["features.4"]["skipped"]
    with pytest.raises(PruneError, match="features.99"):
        propose(small["stats"], small["blocks"], small["layers"], skip_blocks=["features.99"], **SETTINGS)


def test_rank_covers_every_channel_of_every_prunable_block_with_its_prunability(small):
    criterion = Criterion(threshold=CAPTURED)
    ranking = criterion.rank(small["stats"], small["blocks"], small["layers"])
    assert set(ranking) == {b for b, r in small["blocks"].items() if "expand" in r}
    for b, ranked in ranking.items():
        assert [c for _, c in ranked] == list(range(small["blocks"][b]["hidden_channels"]))
        expected = scores.prunability(small["stats"], small["layers"][b], "deadness", CAPTURED)
        assert [p for p, _ in ranked] == expected.tolist()
    assert "features.4" not in criterion.replace(skip_blocks=("features.4",)).rank(
        small["stats"], small["blocks"], small["layers"]
    )


# --- class awareness --------------------------------------------------------------------------------------


def _class_case(images_of_class_2):
    """Channel 0 dead except on class 2; channel 1 dead everywhere; the other 14 alive everywhere."""
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 3, 3, 3] + [2] * images_of_class_2)
    acts = torch.rand(len(labels), 16, 2, 2, generator=torch.Generator().manual_seed(1)) + 0.5
    acts[:, 1] = 0
    acts[labels != 2, 0] = 0
    roles = {"expand": "e", "hidden_channels": 16, "project": "p"}
    return stats_from({"layer": acts}, labels), {"b": roles}, {"b": "layer"}


@pytest.mark.parametrize("class_aware,images,expected", [(False, 3, [0, 1]), (True, 3, [1]), (True, 1, [0, 1])])
def test_class_aware_keeps_channels_alive_for_a_well_sampled_class(class_aware, images, expected):
    stats, blocks, layers = _class_case(images)
    proposals = propose(
        stats,
        blocks,
        layers,
        threshold=CAPTURED,
        deadness_threshold=0.5,
        round_to=1,
        min_keep_ratio=0,
        class_aware=class_aware,
        min_class_samples=2,
    )
    assert proposals["b"]["prune"] == expected


def test_class_deadness_range_spans_the_classes():
    stats, _, _ = _class_case(3)
    low, high = ActivationStats(stats).class_deadness_range("layer", CAPTURED, 2)
    assert (low[0].item(), high[0].item()) == (0.0, 1.0)
    assert (low[1].item(), high[1].item()) == (1.0, 1.0)
    assert low[2:].max().item() == high[2:].max().item() == 0.0
    low, _ = ActivationStats(stats).class_deadness_range("layer", CAPTURED, 100)
    assert torch.isnan(low).all()


# --- thresholds from histograms ---------------------------------------------------------------------------


def test_replanning_at_a_bin_edge_matches_the_direct_count(small):
    layer = small["layers"]["features.9"]
    mag = small["acts"][layer].abs().double()
    for edge in EDGES[2:-1].tolist():
        direct = (mag < edge).double().mean((0, 2, 3))
        torch.testing.assert_close(ActivationStats(small["stats"]).deadness(layer, edge), direct)
        cut = float(direct.median())
        proposals = propose(
            small["stats"],
            small["blocks"],
            small["layers"],
            threshold=edge,
            round_to=1,
            deadness_threshold=cut,
            min_keep_ratio=0,
        )
        pruned = set(proposals["features.9"]["prune"])
        assert pruned == set(torch.nonzero(direct > cut).flatten().tolist())


def test_captured_threshold_uses_the_exact_count_between_edges(small):
    layer = small["layers"]["features.9"]
    mag = small["acts"][layer].abs().double()
    direct = (mag < CAPTURED).double().mean((0, 2, 3))
    lower_edge = float(EDGES[EDGES <= CAPTURED].max())
    assert not torch.equal(direct, (mag < lower_edge).double().mean((0, 2, 3)))  # the edge alone would be wrong
    torch.testing.assert_close(ActivationStats(small["stats"]).deadness(layer, CAPTURED), direct)


# --- the plan file ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("score", [s for s in scores.SCORES if s != "obs"])  # obs: test_criterion
@pytest.mark.parametrize("class_aware", [False, True])
def test_each_score_gives_a_plan_that_loads(small, tmp_path, score, class_aware):
    made = build_plan(small, score, class_aware=class_aware)
    path = plan.write_plan(tmp_path / "plan.json", made)
    loaded = plan.load_plan(path, blocks=small["blocks"], widths=small["widths"])
    assert loaded == json.loads(json.dumps(made))
    assert set(loaded["layers"]) == set(small["layers"].values())
    assert plan.check_plan_matches_model(loaded, ARCH, small["widths"], "ab" * 32) is None


def test_plan_json_is_byte_identical_for_the_same_inputs(small, tmp_path):
    again = {**small, "stats": stats_from({k: v.clone() for k, v in small["acts"].items()}, small["labels"])}
    first = plan.write_plan(tmp_path / "a.json", build_plan(small))
    second = plan.write_plan(tmp_path / "b.json", build_plan(again))
    text = open(first, "rb").read()
    assert text == open(second, "rb").read()
    assert text.startswith(b'{\n  "schema_version": 1,')
    for entry in json.loads(text)["blocks"].values():
        assert entry["prune"] == sorted(entry["prune"])
    for entry in json.loads(text)["layers"].values():
        assert all(v == round(v, 6) for v in entry["channel_deadness"])


def test_plan_matching_names_the_first_differing_layer(small):
    made = json.loads(json.dumps(build_plan(small)))
    with pytest.raises(PruneError, match="mobilenet_v3_large"):
        plan.check_plan_matches_model(made, "mobilenet_v3_large", small["widths"], "ab" * 32)
    widths = copy.deepcopy(small["widths"])
    widths["features.4.block.0.0"]["out"] = 48
    with pytest.raises(PruneError, match=r"features\.4\.block\.0\.0 "):
        plan.check_plan_matches_model(made, ARCH, widths, "ab" * 32)
    assert "sha256" in plan.check_plan_matches_model(made, ARCH, small["widths"], "cd" * 32)


@pytest.fixture(scope="module")
def valid_plan(small):
    """A valid plan, as loaded from JSON."""
    return json.loads(json.dumps(build_plan(small)))


def _first_pruned(p):
    return next(b for b, e in p["blocks"].items() if e["prune"])


def _set(path, value):
    def mutate(p):
        *parents, last = path(p) if callable(path) else path
        target = p
        for key in parents:
            target = target[key]
        target[last] = value

    return mutate


def _dup(p):
    block = p["blocks"][_first_pruned(p)]
    block["prune"].append(block["prune"][0])
    block["kept"] -= 1


def _below_floor(p):
    block = p["blocks"][_first_pruned(p)]
    block["prune"] = list(range(block["hidden_channels"] - 4))
    block["kept"] = 4


def _unknown_block(p):
    p["blocks"]["features.42"] = p["blocks"].pop(_first_pruned(p))


def _index(i):
    return lambda p: ["blocks", _first_pruned(p), "prune", i]


MUTATIONS = {
    "schema_version": _set(["schema_version"], 2),
    "kind": _set(["kind"], "something-else"),
    "score": _set(["score"], "magnitude"),
    "threshold": _set(["threshold"], "0.1"),
    "class_aware": _set(["class_aware"], 1),
    "round_to": _set(["round_to"], 0),
    "min_keep_ratio": _set(["min_keep_ratio"], 1.5),
    "blocks": _set(["blocks"], []),
    "model": _set(["model", "widths"], {"features.0.0": {"in": "3"}}),
    "prune": _dup,
    "prune[": _set(_index(0), -1),
    "prune[0]": _set(_index(0), 100000),
    "prune[1]": _set(_index(1), 1.0),
    "prune[2]": _set(_index(2), True),
    "kept": _set(lambda p: ["blocks", _first_pruned(p), "kept"], 3),
    "floor": _below_floor,
    "features.42": _unknown_block,
    "channel_deadness": _set(lambda p: ["layers", next(iter(p["layers"])), "channel_deadness", 0], 2.0),
    "provenance": lambda p: p.pop("provenance"),
}


@pytest.mark.parametrize("key", MUTATIONS)
def test_each_mutation_is_refused_naming_the_key(valid_plan, small, tmp_path, key):
    p = copy.deepcopy(valid_plan)
    MUTATIONS[key](p)
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(p))
    message = "floor" if key == "floor" else key
    with pytest.raises(PruneError, match=f"{re.escape(str(path))}.*{message.replace('[', '.')}"):
        plan.load_plan(path, blocks=small["blocks"], widths=small["widths"])


def test_malformed_json_is_a_prune_error(tmp_path):
    path = tmp_path / "plan.json"
    path.write_text('{"schema_version": 1,')
    with pytest.raises(PruneError, match="plan.json"):
        plan.load_plan(path)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)


def _load_or_prune_error(path, value, small):
    path.write_text(json.dumps(value))
    try:
        plan.load_plan(path, blocks=small["blocks"], widths=small["widths"])
    except PruneError as err:  # the one error type load_plan may raise: any other exception fails the test
        assert str(path) in str(err) and "\n" not in str(err)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(JSON)
def test_arbitrary_json_raises_nothing_but_prune_error(small, tmp_path, value):
    _load_or_prune_error(tmp_path / "plan.json", value, small)


def _paths(obj, prefix=()):
    """Every key path into a JSON value, at most 3 items into each list."""
    items = obj.items() if isinstance(obj, dict) else enumerate(obj[:3]) if isinstance(obj, list) else ()
    out = []
    for key, child in items:
        out += [prefix + (key,)] + _paths(child, prefix + (key,))
    return out


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_mutated_plans_raise_nothing_but_prune_error(valid_plan, small, tmp_path, data):
    p = copy.deepcopy(valid_plan)
    *parents, last = data.draw(st.sampled_from(_paths({k: v for k, v in p.items() if k != "provenance"})))
    target = p
    for key in parents:
        target = target[key]
    if data.draw(st.booleans()) and isinstance(target, dict):
        del target[last]
    else:
        target[last] = data.draw(JSON)
    _load_or_prune_error(tmp_path / "plan.json", p, small)


def test_fluctuation_is_the_std_times_the_consumer_column_norm(small):
    layer, roles = small["layers"]["features.4"], small["blocks"]["features.4"]
    acts = small["acts"][layer].double()
    weight = scores.consumer_weight(small["model"], roles)
    std = acts.transpose(0, 1).reshape(acts.shape[1], -1).std(dim=1, correction=0)
    expected = std * torch.linalg.vector_norm(weight.double(), dim=(0, 2, 3))
    torch.testing.assert_close(scores.prunability(small["stats"], layer, "fluctuation", consumer=weight), -expected)


def test_fluctuation_prunes_a_constant_channel_before_a_varying_one(small):
    """A channel whose activation is constant (non-zero) loses nothing after mean compensation: it goes first."""
    layer = small["layers"]["features.4"]
    acts = {k: v.clone() for k, v in small["acts"].items()}
    varying = acts[layer].std(dim=(0, 2, 3)) > 0
    c = int(varying.nonzero()[0])
    acts[layer][:, c] = 3.0
    stats = stats_from(acts, small["labels"])
    prun = scores.prunability(
        stats, layer, "fluctuation", consumer=scores.consumer_weight(small["model"], small["blocks"]["features.4"])
    )
    assert prun[c] > -1e-6 and prun[c] >= prun.max() - 1e-6  # as prunable as the channels that are always 0
    assert int(scores.prunability(stats, layer, "mean_abs").argmin()) == c  # mean |a| = 3: "the most alive"
