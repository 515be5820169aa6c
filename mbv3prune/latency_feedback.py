"""Measured-latency feedback for ``target_latency``: time each candidate plan's whole pruned model and re-aim.

The latency table (``latency``) times every block alone, and blocks alone predict the whole model's saving
only roughly: on the flowers baseline in onnxruntime at batch 1 the blocks alone summed to 1.6x the model's
time, and a plan the table predicted to save 20.6% measured 5.4% *slower*. So the table ranks the chunks,
and the whole model decides how many to take: each candidate plan is cut from a copy of the model and
timed whole against the unpruned model in the table's runtime, device and batch size (interleaved rounds,
``timing.interleaved_ms``, median of ``repeats``). The table's target (the *aim*) is then corrected toward
the asked reduction: by the ratio target / measured on the first correction, by the secant through the two
latest (aim, measured) points after (a plan that measures no saving doubles the aim), kept between the aims
measured short of and past the target. It stops within ``tolerance`` of the target, after ``rounds``
corrections (``rounds`` + 1 timings), or when a new aim gives a plan already measured, and keeps the plan
measured closest to the target.
"""

import copy
import math
import tempfile

from .errors import PruneError
from .latency import runtime_calls
from .prune import prune_blocks
from .timing import interleaved_ms, synchronizer

MAX_AIM = 0.95  # the table's target never goes past this (to_latency_target needs it below 1)
MIN_AIM = 0.005


def next_aim(history, target):
    """The table target to try next, from the rounds so far [{"aim", "measured"}, ...] (latest last).

    A safeguarded secant: the guess (ratio, secant, or double after a plan that saved nothing) must fall
    strictly between the largest aim measured short of the target and the smallest measured past it, else
    the midpoint of those two is taken.
    """
    last = history[-1]
    aim, measured = last["aim"], last["measured"]
    guess = 2 * aim if measured <= 0 else aim * target / measured
    if len(history) > 1 and measured > 0:
        prev = history[-2]
        slope = (measured - prev["measured"]) / (aim - prev["aim"]) if aim != prev["aim"] else 0.0
        if slope > 0:
            guess = aim + (target - measured) / slope
    short = [h["aim"] for h in history if h["measured"] < target]
    past = [h["aim"] for h in history if h["measured"] > target]
    lo, hi = max(short, default=0.0), min(past, default=MAX_AIM)
    if short and past and not lo < guess < hi:
        guess = (lo + hi) / 2
    return min(MAX_AIM, max(MIN_AIM, guess))


def calibrate(plan_at, measure, target, rounds=3, tolerance=0.02):
    """(selection, round) of the plan measured closest to ``target``, and every round [{"aim", "predicted",
    "measured", "channels"}]: ``plan_at(aim)`` -> (selection, predicted reduction), ``measure(selection)`` ->
    measured reduction of the whole model."""
    if rounds < 0 or tolerance < 0:
        raise PruneError(f"LATENCY_CALIBRATE={rounds} and its tolerance {tolerance} must be >= 0")
    history, plans, aim = [], [], target
    for _ in range(rounds + 1):
        selection, predicted = plan_at(aim)
        if selection in plans:
            break  # the new aim gives a plan already measured: nothing more to learn
        plans.append(selection)
        measured = measure(selection)
        if not math.isfinite(measured):
            raise PruneError(f"latency check: the pruned model's measured reduction is {measured}: timing failed")
        history.append(
            {
                "aim": round(aim, 6),
                "predicted": round(predicted, 6),
                "measured": round(measured, 6),
                "channels": sum(map(len, selection.values())),
            }
        )
        if abs(history[-1]["measured"] - target) <= tolerance:
            break
        aim = next_aim(history, target)
    best = min(range(len(history)), key=lambda i: abs(history[i]["measured"] - target))
    return plans[best], best, history


class WholeModel:
    """``measure(selection)``: the latency reduction of ``model`` pruned by ``selection``, timed whole.

    A context manager (it holds the exported ONNX files of the runtime ``spec`` names); the baseline's call is
    prepared once and timed again, interleaved, with every candidate.
    """

    def __init__(self, model, blocks, spec, repeats=200):
        self.model, self.blocks, self.spec, self.repeats = model, blocks, spec, repeats
        self.shape = (3, spec.image_size, spec.image_size)

    def __enter__(self):
        self._dir = tempfile.TemporaryDirectory(prefix="latency_check_")
        self._baseline = self._calls({"baseline": copy.deepcopy(self.model)}, "baseline")["baseline"]
        self._count = 0
        return self

    def __exit__(self, *exc):
        self._dir.cleanup()

    def _calls(self, modules, tag):
        return runtime_calls(modules, self.shape, self.spec, self._dir.name, tag)

    def __call__(self, selection):
        pruned = copy.deepcopy(self.model).cpu()
        prune_blocks(pruned, self.blocks, selection, self.spec.image_size)
        self._count += 1
        calls = {"baseline": self._baseline, **self._calls({"pruned": pruned}, f"round{self._count}")}
        ms = interleaved_ms(calls, self.repeats, self.spec.warmup, synchronizer(self.spec.device))
        return 1 - ms["pruned"] / ms["baseline"]
