"""Dynamic deadness: pruning block k wakes a channel of block k+1; iterative mode must spare it."""

import pytest
import torch

from mbv3prune import capture, iterative
from mbv3prune.blocks import find_blocks
from mbv3prune.criterion import Criterion
from mbv3prune.models import build_model
from mbv3prune.selection import most_prunable

K, NEXT, C0, J, M = "features.2", "features.3", 5, 7, 9  # Small: features.2 -> features.3, neither with SE
THRESHOLD = capture.DEFAULT_THRESHOLD


def set_bn(bn, weight, bias, mean=0.0, var=1.0):
    bn.weight.data.fill_(weight), bn.bias.data.fill_(bias)
    bn.running_mean.fill_(mean), bn.running_var.fill_(var)


@torch.no_grad()
def wired_model():
    """Small where channel C0 of block K is a constant 0.005 (dead at 2**-7) feeding input 0 of block NEXT
    with +10: NEXT's channel J is dead only while C0 exists, channel M alive only while C0 exists."""
    torch.manual_seed(0)
    model = build_model("mobilenet_v3_small", 3).eval()
    k, n = find_blocks(model)[K], find_blocks(model)[NEXT]
    get = model.get_submodule
    dw_bn = get(k["depthwise_bn"])
    dw_bn.weight.data[C0], dw_bn.bias.data[C0] = 0.0, 0.005
    proj = get(k["project"]).weight
    proj[0].zero_()
    proj[0, C0] = 2000.0  # x_0 = 2000 * 0.005 = 10, exactly constant
    set_bn(get(k["project_bn"]), 1.0, 0.0, var=1.0 - 1e-3)  # identity BN
    for ch, sign, bias in ((J, -1.0, 5.0), (M, 1.0, -5.0)):
        w = get(n["expand"]).weight
        w[ch].zero_()
        w[ch, 0] = sign
        e_bn, d_bn = get(n["expand_bn"]), get(n["depthwise_bn"])
        e_bn.weight.data[ch], e_bn.bias.data[ch], e_bn.running_mean[ch], e_bn.running_var[ch] = 1.0, bias, 0.0, 1 - 1e-3
        dw = get(n["depthwise"]).weight
        dw[ch].zero_()
        dw[ch, 0, 1, 1] = 1.0
        d_bn.weight.data[ch], d_bn.bias.data[ch], d_bn.running_mean[ch], d_bn.running_var[ch] = 1.0, 0.0, 0.0, 1 - 1e-3
    return model


def sample():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(6, 3, 32, 32, generator=g), torch.tensor([0, 1, 2, 0, 1, 2])) for _ in range(2)]


CRITERION = Criterion("deadness", THRESHOLD, 0.9, min_keep_ratio=0.25, round_to=1)


def run(model, stats, layers, compensate_fn=None, **schedule):
    """iterative.run on the wired model's sample with CRITERION and the Schedule of ``schedule``."""
    return iterative.run(
        model,
        sample,
        stats,
        layers,
        CRITERION,
        iterative.Schedule(**{"max_rounds": 20, **schedule}),
        capture_point="project_input",
        image_size=32,
        num_classes=3,
        compensate_fn=compensate_fn,
        log=lambda *_: None,
    )


@pytest.fixture(scope="module")
def setup():
    model = wired_model()
    blocks = find_blocks(model)
    stats, layers = capture.capture(model, sample(), blocks, threshold=THRESHOLD, num_classes=3, progress=False)
    return model, blocks, stats, layers


def test_the_wiring_holds(setup):
    _, blocks, stats, _ = setup
    dead = lambda b, c: float(stats[f"{blocks[b]['project']}/below"][c] / stats[f"{blocks[b]['project']}/n"])
    assert dead(K, C0) == 1.0 and dead(NEXT, J) == 1.0 and dead(NEXT, M) == 0.0


def test_one_shot_prunes_the_channel_that_comes_alive(setup):
    _, blocks, stats, layers = setup
    proposals = CRITERION.propose(stats, blocks, layers)
    assert C0 in proposals[K]["prune"] and J in proposals[NEXT]["prune"] and M not in proposals[NEXT]["prune"]


def test_iterative_spares_it_and_never_prunes_a_channel_dead_in_one_measurement_only(setup):
    model, blocks, stats, layers = setup
    pruned, rounds, removed, values = run(model, stats, layers)
    assert C0 in removed[K]
    assert J not in removed.get(NEXT, []) and M not in removed.get(NEXT, [])
    first = rounds[0]
    assert first["pruned"].get(K) and NEXT in first["remeasured"] and J in first["came_alive_downstream"][NEXT]
    assert any(J in r["spared_came_alive"].get(NEXT, []) for r in rounds)
    assert values["initial_values"][NEXT][J] == 1.0 and values["latest_values"][NEXT][J] == 0.0
    assert values["latest_values"][NEXT][M] == 1.0  # M died, but it was alive in the first measurement
    assert not any(b in removed for b in blocks if b not in [r2 for r in rounds for r2 in r["pruned"]])
    x = torch.randn(2, 3, 32, 32)
    assert pruned(x).shape == (2, 3)


def test_compensation_keeps_the_downstream_channel_dead(setup):
    from mbv3prune.compensate import compensate

    model, blocks, stats, layers = setup
    fold = lambda m, b, chosen, s: compensate(m, b, chosen, s)
    _, rounds, removed, values = run(model, stats, layers, fold)
    assert C0 in removed[K] and J in removed[NEXT]
    assert values["latest_values"][NEXT][J] == 1.0


def test_blocks_upstream_are_not_remeasured_and_target_stops(setup):
    model, blocks, stats, layers = setup
    _, rounds, _, _ = run(model, stats, layers, target_macs_reduction=1e-4)
    assert len(rounds) == 1
    order = list(blocks)
    pruned_block = next(iter(rounds[0]["pruned"]))
    assert all(order.index(b) > order.index(pruned_block) for b in rounds[0]["remeasured"])


def test_quotas_take_exactly_each_blocks_count_by_consistent_deadness(setup):
    model, blocks, stats, layers = setup
    layer = blocks[K]["project"]
    all_dead = int((stats[f"{layer}/below"] == stats[f"{layer}/n"]).sum())  # C0 among them
    quotas = {K: all_dead, NEXT: 2}
    _, rounds, removed, values = run(model, stats, layers, quotas=quotas)
    assert {b: len(v) for b, v in removed.items()} == quotas
    assert C0 in removed[K]
    consistent = torch.minimum(values["initial_values"][NEXT], values["latest_values"][NEXT])
    assert consistent[J] == 0.0  # dead at first, alive after K was pruned
    assert removed[NEXT] == most_prunable(consistent, torch.ones_like(consistent, dtype=torch.bool), 2)
    assert [list(r["pruned"]) for r in rounds] == [[K], [NEXT]]
