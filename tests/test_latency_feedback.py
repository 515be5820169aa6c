"""Tests of mbv3prune.latency_feedback: re-aiming the latency table's target from the whole model's measured
reduction, on INJECTED plans and measurements (no speed is asserted), and the whole-model measurement's
structure on a real, tiny model."""

import pytest

from mbv3prune import latency, latency_feedback
from mbv3prune.blocks import find_blocks
from mbv3prune.errors import PruneError
from tests.helpers import randomized_model


def _plans(step=0.01):
    """plan_at(aim): one channel per ``step`` of aim (so plans differ), predicted = aim."""
    return lambda aim: ({"b": list(range(round(aim / step)))}, aim)


def _measured(scale, offset=0.0):
    """measure(selection): a whole model saving ``scale`` x the channels' share (minus ``offset``)."""
    return lambda sel: scale * len(sel["b"]) * 0.01 - offset


@pytest.mark.parametrize("scale, offset", [(0.5, 0.0), (2.0, 0.0), (0.7, 0.05), (0.3, 0.0)])
def test_re_aiming_reaches_the_target_when_the_table_is_off_by_a_factor_or_an_offset(scale, offset):
    chosen, best, rounds = latency_feedback.calibrate(_plans(), _measured(scale, offset), 0.2, rounds=3)
    assert abs(rounds[best]["measured"] - 0.2) <= 0.02
    assert chosen == _plans()(rounds[best]["aim"])[0] and rounds[0]["aim"] == 0.2
    assert all(set(r) == {"aim", "predicted", "measured", "channels"} for r in rounds)


def test_a_plan_measured_slower_doubles_the_aim_and_the_closest_plan_is_kept():
    # the first plan measures a slowdown (the table's prediction was wrong in sign): the aim doubles
    measure = lambda sel: -0.05 if len(sel["b"]) <= 20 else 0.004 * len(sel["b"]) - 0.06  # noqa: E731
    chosen, best, rounds = latency_feedback.calibrate(_plans(), measure, 0.2, rounds=1)
    assert [r["aim"] for r in rounds] == [0.2, 0.4] and best == 1  # 0.1 measured at 0.4 is closer than -0.05
    assert len(chosen["b"]) == 40


def test_no_rounds_trusts_the_table_and_a_repeated_plan_stops_the_search():
    chosen, best, rounds = latency_feedback.calibrate(_plans(), _measured(0.5), 0.2, rounds=0)
    assert len(rounds) == 1 and best == 0 and len(chosen["b"]) == 20
    # every aim gives the same plan (the table has nothing more to take): measured once, then stop
    same = lambda aim: ({"b": [0, 1]}, 0.05)  # noqa: E731
    chosen, best, rounds = latency_feedback.calibrate(same, lambda sel: 0.05, 0.2, rounds=3)
    assert len(rounds) == 1 and chosen == {"b": [0, 1]}
    with pytest.raises(PruneError, match="timing failed"):
        latency_feedback.calibrate(_plans(), lambda sel: float("nan"), 0.2)
    with pytest.raises(PruneError, match="LATENCY_CALIBRATE=-1"):
        latency_feedback.calibrate(same, lambda sel: 0.05, 0.2, rounds=-1)


def test_next_aim_uses_the_ratio_then_the_secant_and_stays_in_range():
    assert latency_feedback.next_aim([{"aim": 0.2, "measured": 0.1}], 0.2) == pytest.approx(0.4)
    two = [{"aim": 0.2, "measured": 0.1}, {"aim": 0.4, "measured": 0.15}]  # slope 0.25: 0.05 more needs 0.2
    assert latency_feedback.next_aim(two, 0.2) == pytest.approx(0.6)
    assert latency_feedback.next_aim([{"aim": 0.6, "measured": 0.01}], 0.2) == latency_feedback.MAX_AIM
    assert latency_feedback.next_aim([{"aim": 0.6, "measured": 0.0}], 0.2) == latency_feedback.MAX_AIM
    overshot = [{"aim": 0.4, "measured": 0.3}, {"aim": 0.2, "measured": -0.01}]  # doubling would repeat 0.4
    assert latency_feedback.next_aim(overshot, 0.2) == pytest.approx(0.3)  # the midpoint of the bracket
    falling = [{"aim": 0.2, "measured": 0.1}, {"aim": 0.4, "measured": 0.05}]  # no positive slope: the ratio
    assert latency_feedback.next_aim(falling, 0.2) == latency_feedback.MAX_AIM  # 0.4 x 0.2 / 0.05, capped


def test_the_whole_model_measurement_times_a_pruned_copy_against_the_baseline():
    model = randomized_model("mobilenet_v3_small", 5)
    blocks = find_blocks(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    name = next(b for b, r in blocks.items() if r.get("expand"))
    spec = latency.TableSpec(runtime="eager", image_size=32, repeats=2, warmup=1)
    with latency_feedback.WholeModel(model, blocks, spec, repeats=3) as measure:
        reduction = measure({name: list(range(8))})
    assert isinstance(reduction, float) and reduction < 1
    assert all((model.state_dict()[k] == v).all() for k, v in before.items())  # the model is left as it was
