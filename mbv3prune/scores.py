"""Scores per hidden channel, from the captured statistics (and, for the weighted ones, the project conv).

A block is scored on one captured layer, its *proposal layer* (``blocks.capture_layer``), whose channels
are the block's hidden channels. Every score becomes a *prunability*, higher = prune first, so proposing
and global ranking share one code path. What makes a channel a *candidate* depends on the score:

==============  ==================================================  =====================================
score           value per channel                                   candidate when
==============  ==================================================  =====================================
deadness        fraction of |a| < THRESHOLD (higher = prunable)     deadness > DEADNESS_THRESHOLD
mean_abs        mean |a| (lower = prunable)                         mean |a| < THRESHOLD
contribution    mean |a| x L2 norm of the project conv's input      contribution < THRESHOLD
                column for the channel (lower = prunable)
fluctuation     std(a) x the same L2 norm (lower = prunable): the    fluctuation < THRESHOLD
                RMS change of the project output that removing the
                channel leaves after mean compensation
obs             the optimal-brain-surgeon cost of removing the      relative block-output error of the
                channel with the others refit, chosen greedily      greedy removals so far <= THRESHOLD
                and jointly per block (``criterion``, from the
                project input's covariance: SECOND_MOMENTS=True)
==============  ==================================================  =====================================

THRESHOLD is thus an activation magnitude for deadness and mean_abs, a cut on mean |a| x ||w|| (or
std(a) x ||w||) for contribution (fluctuation), and an allowed relative error for obs. With
``output_units`` the column norm of contribution and fluctuation is weighted by the project BN's scale,
sqrt(sum_o d_o W[o, c]**2) with d_o = gamma_o**2 / (running_var_o + eps): the change in the block's output,
comparable across blocks (fluctuation**2 is then obs's cost with a diagonal covariance).
"""

import torch
from torch import nn

from .activation_stats import ActivationStats
from .errors import PruneError

SCORES = ("deadness", "mean_abs", "contribution", "fluctuation", "obs")
WEIGHTED = ("contribution", "fluctuation")  # scores that need the consumer (project conv) weights


def check_score(score):
    """``score`` itself, or a PruneError listing the valid scores."""
    if score not in SCORES:
        raise PruneError(f"unknown SCORE {score!r}: use one of {', '.join(SCORES)}")
    return score


def consumer_weight(weights, roles):
    """The project conv's weight of a block, from a model or a state_dict (the consumer of its hidden channels)."""
    state = weights.state_dict() if isinstance(weights, nn.Module) else weights
    key = f"{roles['project']}.weight"
    if key not in state:
        raise PruneError(f"weights have no {key}: they do not belong to this model")
    return state[key]


def input_column_norms(weight, d=None):
    """L2 norm of each input channel's column of a 1x1 conv weight [out, in, 1, 1], its rows weighted by ``d``
    [out] when given: sqrt(sum_o d_o W[o, c]**2)."""
    w = weight.detach().double().reshape(weight.shape[0], weight.shape[1], -1)
    if d is not None:
        w = w * torch.as_tensor(d, dtype=torch.float64).sqrt().to(w.device)[:, None, None]
    return w.transpose(0, 1).reshape(w.shape[1], -1).norm(dim=1)


def output_scale(weights, roles):
    """d_o = gamma_o**2 / (running_var_o + eps) of a block's project BN (float64 [out]), from a model or a
    state_dict (eps: the module's, or torchvision MobileNetV3's 0.001 for a state_dict)."""
    if isinstance(weights, nn.Module):
        bn = weights.get_submodule(roles["project_bn"])
        gamma, var, eps = bn.weight, bn.running_var, bn.eps
    else:
        key = roles["project_bn"]
        if f"{key}.running_var" not in weights:
            raise PruneError(f"weights have no {key}.running_var: they do not belong to this model")
        gamma, var, eps = weights.get(f"{key}.weight"), weights[f"{key}.running_var"], 1e-3
    gamma = torch.ones_like(var) if gamma is None else gamma
    return gamma.detach().double() ** 2 / (var.detach().double() + eps)


def channel_score(stats, layer, score, threshold=None, consumer=None, scale=None):
    """Per channel value of ``score`` (deadness, mean |a|, contribution or fluctuation), before orienting it.

    ``consumer``: the project conv's weight (contribution, fluctuation); ``scale``: its BN's d (output units).
    obs is a joint, per-block score: ``criterion.Criterion`` computes it.
    """
    stats = ActivationStats.of(stats)
    if score == "obs":
        raise PruneError("SCORE=obs is chosen jointly per block: use criterion.Criterion")
    if check_score(score) == "deadness":
        if threshold is None and stats.threshold is None:
            raise PruneError("SCORE=deadness needs a THRESHOLD: the activation stats do not record one")
        return stats.deadness(layer, threshold)
    value = stats.mean_abs(layer) if score != "fluctuation" else stats.std(layer)
    if score == "mean_abs":
        return value
    if consumer is None:
        raise PruneError(f"SCORE={score} needs the model's weights to score {layer}")
    norms = input_column_norms(consumer, scale).to(value.device)
    if norms.shape != value.shape:
        raise PruneError(f"{layer} has {value.numel()} channels but its consumer conv takes {norms.numel()}")
    return value * norms


def oriented(value, score):
    """A score's values turned so that higher = more prunable."""
    return value if score == "deadness" else -value


def prunability(stats, layer, score, threshold=None, consumer=None):
    """Per channel prunability of ``score``: HIGHER = prune first, whatever the score."""
    return oriented(channel_score(stats, layer, score, threshold, consumer), score)


def is_candidate(value, score, threshold, deadness_threshold):
    """Candidate mask from a score's values: deadness > DEADNESS_THRESHOLD, else value < THRESHOLD."""
    return value > deadness_threshold if check_score(score) == "deadness" else value < threshold
