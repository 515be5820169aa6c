"""How channels are chosen: one frozen settings object that scores, proposes and ranks.

A ``Criterion`` holds what every stage and benchmark used to pass as a dozen loose arguments: the score,
its thresholds, the floors and rounding, class awareness and the blocks to skip. It is built from a
script's constants (``from_config``) or from a plan file (``from_plan``), and, like torch-pruning's
importance objects, it is called on the statistics: ``propose`` gives the threshold-mode proposal of every
block, ``rank`` the prunability of every channel of every prunable block for the global MACs ranking
(``selection.to_macs_target``) or the same ratio per block (``selection.uniform_ratio``).
"""

import dataclasses

import torch

from . import scores
from .activation_stats import ActivationStats, check_threshold
from .blocks import prunable, skip_reason
from .errors import PruneError
from .reconstruct import obs_removal
from .selection import keep_count, min_kept, proposal

_CONFIG = {
    "score": "SCORE",
    "threshold": "THRESHOLD",
    "deadness_threshold": "DEADNESS_THRESHOLD",
    "min_keep_ratio": "MIN_KEEP_RATIO",
    "round_to": "ROUND_TO",
    "class_aware": "CLASS_AWARE",
    "min_class_samples": "MIN_CLASS_SAMPLES",
    "skip_blocks": "SKIP_BLOCKS",
    "ridge": "RIDGE",
    "output_units": "OUTPUT_UNITS",
}
_OPTIONAL = {"ridge": 1e-3, "output_units": False}  # plan fields newer than schema 1's first plans
_PLAN = ("score", "threshold", "deadness_threshold", "class_aware", "min_class_samples", "min_keep_ratio", "round_to")


@dataclasses.dataclass(frozen=True)
class Criterion:
    score: str = "deadness"  # obs, fluctuation, contribution, mean_abs or deadness (see scores.py)
    threshold: float = 2.0**-7  # deadness: |a| below this is inactive; obs: allowed relative error; else the cut
    deadness_threshold: float = 0.9  # deadness: a channel inactive more often than this is a candidate
    min_keep_ratio: float = 0.25  # every block keeps at least this fraction of its hidden channels
    round_to: int = 8  # kept hidden channels are a multiple of this
    class_aware: bool = False  # spare channels alive for some class (propose); rank deadness by that class
    min_class_samples: int = 5  # classes with fewer sampled images do not count for class awareness
    skip_blocks: tuple = ()  # blocks never pruned
    ridge: float = 1e-3  # obs: H = cov + ridge x mean diag(cov) (the refit's ridge too)
    output_units: bool = False  # contribution / fluctuation: weigh the column norm by the project BN's scale

    def __post_init__(self):
        scores.check_score(self.score)
        if self.score == "obs" and self.class_aware:
            raise PruneError(
                "CLASS_AWARE=True with SCORE=obs is refused: the stratified sample already weights "
                "every species equally in the covariance obs is computed from"
            )
        if not 0 <= self.ridge < float("inf"):
            raise PruneError(f"RIDGE={self.ridge} must be a number >= 0")
        check_threshold(self.threshold)
        if not 0 <= self.deadness_threshold <= 1:
            raise PruneError(f"DEADNESS_THRESHOLD={self.deadness_threshold} must lie in [0, 1]")
        min_kept(1, self.min_keep_ratio)  # range check
        if self.round_to < 1 or self.min_class_samples < 1:
            raise PruneError(
                f"ROUND_TO={self.round_to} and MIN_CLASS_SAMPLES={self.min_class_samples} must be at least 1"
            )
        object.__setattr__(self, "skip_blocks", tuple(self.skip_blocks))

    @classmethod
    def from_config(cls, cfg, **overrides):
        """From a script's constants (those it has; the rest keep their defaults), then ``overrides``."""
        given = {field: cfg[name] for field, name in _CONFIG.items() if name in cfg}
        return cls(**{**given, **overrides})

    @classmethod
    def from_plan(cls, plan, **overrides):
        """The criterion a plan file was made with, then ``overrides`` (e.g. the pruning stage's floors)."""
        return cls(**{**{k: plan[k] for k in _PLAN}, **{k: plan.get(k, v) for k, v in _OPTIONAL.items()}, **overrides})

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    def plan_fields(self):
        """The plan file's record of this criterion (ridge and output units only where the score uses them)."""
        used = {"ridge"} if self.score == "obs" else {"output_units"} if self.score in scores.WEIGHTED else set()
        return {k: getattr(self, k) for k in _PLAN + tuple(sorted(used))}

    def min_kept(self, hidden):
        return min_kept(hidden, self.min_keep_ratio)

    def keep_count(self, hidden, n_candidates):
        return keep_count(hidden, n_candidates, self.min_keep_ratio, round_to=self.round_to)

    def check_skips(self, blocks):
        unknown = [b for b in self.skip_blocks if b not in blocks]
        if unknown:
            raise PruneError(f"SKIP_BLOCKS names unknown block {unknown[0]!r}: blocks are {', '.join(blocks)}")

    def obs(self, stats, block, roles, weights):
        """The block's greedy OBS removal (``reconstruct.ObsResult``) down to its floor, from the captured
        covariance of the project conv input."""
        if weights is None:
            raise PruneError(f"SCORE=obs needs the model's weights to score {block}")
        stats = ActivationStats.of(stats)
        if not stats.has_second_moments(block):
            raise PruneError(
                f"SCORE=obs needs the covariance of {block}'s project input: capture with "
                "SECOND_MOMENTS=True (visualize_neuron_activations.py --RECAPTURE=True)"
            )
        _, _, cov = stats.block_moments(block)
        weight = scores.consumer_weight(weights, roles)
        if cov.shape[0] != weight.shape[1]:
            raise PruneError(
                f"the covariance of {block} is {cov.shape[0]} wide but its project conv takes "
                f"{weight.shape[1]} channels: the stats belong to another model"
            )
        hidden = roles["hidden_channels"]
        return obs_removal(
            cov,
            weight.reshape(weight.shape[0], -1),
            scores.output_scale(weights, roles),
            self.ridge,
            n_remove=hidden - self.min_kept(hidden),
        )

    def output_costs(self):
        """Whether ``costs`` applies: contribution and fluctuation in output units, whose squares are costs in
        the block's output, summed and ranked per millisecond saved like obs's: fluctuation**2 is exactly the
        error a channel's removal leaves after mean compensation (obs's cost with a diagonal covariance),
        contribution**2 a proxy (a lower bound of the error without compensation)."""
        return self.output_units and self.score in scores.WEIGHTED

    def costs(self, stats, blocks, layers, weights):
        """{block: [(cost, channel)]}: the square of the score in output units (``output_costs``), over the same
        channels as ``rank``; lower = cheaper to remove."""
        if not self.output_costs():
            raise PruneError(f"SCORE={self.score} with OUTPUT_UNITS={self.output_units} is not a cost")
        ranking = self.rank(stats, blocks, layers, weights)
        return {name: [(p * p, c) for p, c in ranked] for name, ranked in ranking.items()}

    def removals(self, stats, blocks, weights):
        """{block: [(channel, cost of removing it next)]} in greedy OBS order for every prunable block."""
        out = {}
        for name, roles in blocks.items():
            if prunable(roles) and name not in self.skip_blocks:
                result = self.obs(stats, name, roles, weights)
                out[name] = list(zip(result.order, result.costs.tolist()))
        return out

    def _obs_values(self, stats, block, roles, weights):
        """Per channel relative block-output error once the greedy removal has reached it (inf: never removed)."""
        result = self.obs(stats, block, roles, weights)
        value = torch.full((roles["hidden_channels"],), float("inf"), dtype=torch.float64)
        value[result.order] = result.costs.cumsum(0) / max(float(result.variance), torch.finfo(torch.float64).tiny)
        return value

    def values(self, stats, roles, layer, weights=None, block=None):
        """Per hidden channel value of the score (not yet oriented), checked against the block's width."""
        if self.score == "obs":
            return self._obs_values(stats, block, roles, weights)
        consumer = (
            scores.consumer_weight(weights, roles) if self.score in scores.WEIGHTED and weights is not None else None
        )
        scale = scores.output_scale(weights, roles) if self.output_units and consumer is not None else None
        value = scores.channel_score(stats, layer, self.score, self.threshold, consumer, scale)
        if value.numel() != roles["hidden_channels"]:
            raise PruneError(
                f"activation stats for {layer} have {value.numel()} channels, but the block has "
                f"{roles['hidden_channels']}: the stats belong to another model"
            )
        return value

    def alive_for_some_class(self, stats, layer):
        """Mask of channels alive (deadness <= DEADNESS_THRESHOLD) for some class with enough images."""
        dead = ActivationStats.of(stats).class_deadness(layer, self.threshold, self.min_class_samples)
        return (dead <= self.deadness_threshold).any(0)

    def candidates(self, stats, roles, layer, weights=None, block=None):
        """(prunability, candidate mask) of a block's hidden channels, scored on ``layer`` (obs: ``block``'s
        covariance; a channel is a candidate while the greedy removal's relative error stays <= THRESHOLD)."""
        value = self.values(stats, roles, layer, weights, block)
        candidate = scores.is_candidate(value, self.score, self.threshold, self.deadness_threshold)
        if self.class_aware:
            candidate &= ~self.alive_for_some_class(stats, layer)
        return scores.oriented(value, self.score), candidate

    def propose_block(self, stats, name, roles, layer, weights=None):
        """One block's proposal: {layer, hidden_channels, candidates, kept, prune[, skipped]}."""
        hidden = roles["hidden_channels"]
        entry = {
            "hidden_channels": hidden,
            **({"layer": layer} if layer else {}),
            "candidates": 0,
            "kept": hidden,
            "prune": [],
        }
        reason = skip_reason(name, roles, self.skip_blocks)
        if reason:
            return {**entry, "skipped": reason}
        if layer is None:
            raise PruneError(f"no captured layer is given for block {name}")
        prun, candidate = self.candidates(stats, roles, layer, weights, name)
        n, kept, prune = proposal(hidden, prun, candidate, self.min_keep_ratio, self.round_to)
        return {**entry, "candidates": n, "kept": kept, "prune": prune}

    def propose(self, stats, blocks, layers, weights=None):
        """{block: proposal} for every block; blocks without an expand conv, or skipped, prune nothing and say why."""
        self.check_skips(blocks)
        layers = proposal_map(layers)
        return {
            name: self.propose_block(stats, name, roles, layers.get(name), weights) for name, roles in blocks.items()
        }

    def rank(self, stats, blocks, layers, weights=None):
        """{block: [(prunability, channel)]} over every hidden channel of every prunable block (higher = prune
        first). Class-aware deadness ranks a channel by its deadness in the class where it is most alive."""
        layers, ranking = proposal_map(layers), {}
        for name, roles in blocks.items():
            if not prunable(roles) or name in self.skip_blocks:
                continue
            prun = scores.oriented(self.values(stats, roles, layers[name], weights, name), self.score)
            if self.class_aware and self.score == "deadness":
                per_class = ActivationStats.of(stats).class_deadness(
                    layers[name], self.threshold, self.min_class_samples
                )
                if per_class.shape[0]:
                    prun = torch.minimum(prun, per_class.amin(0).to(prun.device))
            ranking[name] = list(zip(prun.tolist(), range(len(prun))))
        return ranking

    def cut(self):
        """The candidate rule in words, for reports: e.g. "deadness > 0.9" or "fluctuation < 0.05"."""
        if self.score == "deadness":
            return f"deadness > {self.deadness_threshold}"
        if self.score == "obs":
            return f"obs relative error <= {self.threshold:g}"
        return f"{self.score} < {self.threshold:g}"


def proposal_map(layers):
    """{block: proposal layer} from either that map or capture's {layer: {"block", "proposal", ...}} description."""
    if all(isinstance(v, str) for v in layers.values()):
        return dict(layers)
    return {
        info["block"]: layer
        for layer, info in layers.items()
        if isinstance(info, dict) and info.get("proposal") and "block" in info
    }
