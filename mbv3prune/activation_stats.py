"""The one reader of a capture's tensors: per block and channel, the statistics every other module asks for.

``capture`` writes running totals under keys ``LAYER/stat`` (see its docstring); this module alone reads
them back. ``ActivationStats`` wraps the dict of tensors (as loaded from ``activation_stats.pt``) and
answers: elements counted, mean, variance, mean |a|, deadness at any threshold (exact at the captured one,
else from the histograms), per-neuron deadness, per-class views and the pre-gate means for compensation.
Scores, compensation, iterative mode and plots ask it instead of reading keys, so a change to the format
touches this file and ``capture`` only.

Histogram bins are fixed (``capture.hist_edges``): a threshold that is not a bin edge is read at the largest
edge below it (``snap_threshold``), never overstating deadness.
"""

import math

import torch

from .errors import PruneError

MAX_THRESHOLD = 1e3  # |a| thresholds live in (0, MAX_THRESHOLD): the histograms' regular bins end at 2**10


def check_threshold(threshold, name="THRESHOLD"):
    """``threshold`` as a float; a PruneError unless it is a number in (0, MAX_THRESHOLD)."""
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold < MAX_THRESHOLD:
        raise PruneError(f"{name}={threshold!r} must be a number in (0, {MAX_THRESHOLD:g})")
    return float(threshold)


def _edges_below(edges, threshold):
    """How many leading bins have an upper edge <= threshold."""
    return int((edges[1:] <= check_threshold(threshold)).sum())


def snap_threshold(threshold, edges):
    """The largest bin edge <= ``threshold``: the threshold that ``deadness_from_hist`` actually applies."""
    return float(edges[_edges_below(edges, threshold)])


def deadness_from_hist(hist, edges, threshold):
    """Fraction of |a| < threshold per row of ``hist`` [..., NB] (NaN where a row is empty).

    Exact when ``threshold`` is a bin edge. Otherwise the count covers the whole bins whose upper edge is
    <= threshold, i.e. the deadness at ``snap_threshold(threshold, edges)``: never more than the true one.
    """
    k = _edges_below(edges, threshold)
    total = hist.sum(-1).double()
    return hist[..., :k].sum(-1).double() / total


class ActivationStats:
    """Read-only view of a capture's tensors (a dict ``{key: tensor}``); ``ActivationStats.of`` accepts either."""

    def __init__(self, tensors):
        self.tensors = tensors

    @classmethod
    def of(cls, stats):
        """``stats`` itself when it is an ActivationStats, else a view of the dict of tensors."""
        return stats if isinstance(stats, cls) else cls(stats)

    def _get(self, key):
        if key not in self.tensors:
            layer = key.rsplit("/", 1)[0]
            raise PruneError(f"activation stats have no {key}: was layer {layer} captured?")
        return self.tensors[key]

    def has(self, layer):
        """Whether ``layer`` was captured."""
        return f"{layer}/n" in self.tensors

    @property
    def threshold(self):
        """The THRESHOLD the ``below`` counts were taken at, or None when the stats do not record it."""
        value = self.tensors.get("threshold")
        return None if value is None else float(value)

    @property
    def edges(self):
        if "hist_edges" not in self.tensors:
            raise PruneError("activation stats have no hist_edges: they were not written by capture")
        return self.tensors["hist_edges"]

    def elements(self, layer):
        """Elements counted per channel (images x positions), checked positive."""
        n = int(self._get(f"{layer}/n"))
        if n <= 0:
            raise PruneError(f"activation stats {layer}/n is {n}: no activations were counted for {layer}")
        return n

    def channels(self, layer):
        return self._get(f"{layer}/sum").numel()

    def mean(self, layer):
        """Per channel mean of a (float64)."""
        return self._get(f"{layer}/sum").double() / self.elements(layer)

    def mean_abs(self, layer):
        """Per channel mean |a| (float64)."""
        return self._get(f"{layer}/sum_abs").double() / self.elements(layer)

    def var(self, layer):
        """Per channel population variance of a: from the Chan-merged moments when captured (exact for
        near-constant channels), else sum_sq / n - mean**2 clamped at 0."""
        if f"{layer}/chan_m2" in self.tensors:
            return self.moments(f"{layer}/chan")[2]
        mean = self.mean(layer)
        return (self._get(f"{layer}/sum_sq").double() / self.elements(layer) - mean**2).clamp_min(0)

    def moments(self, prefix):
        """(n, mean, covariance) of a Chan-merged moment triple ``{prefix}_n/_mean/_m2`` (CPU float64; the
        covariance is M2 / n, [C] for a per-channel triple, [C, C] for a full one)."""
        for suffix in ("_n", "_mean", "_m2"):
            if f"{prefix}{suffix}" not in self.tensors:
                raise PruneError(f"statistics have no {prefix}{suffix}: capture with SECOND_MOMENTS=True first")
        n = int(self.tensors[f"{prefix}_n"])
        if n <= 0:
            raise PruneError(f"statistics {prefix}_n is {n}: the capture saw no activations there")
        mean = torch.as_tensor(self.tensors[f"{prefix}_mean"]).to("cpu", torch.float64)
        m2 = torch.as_tensor(self.tensors[f"{prefix}_m2"]).to("cpu", torch.float64)
        return n, mean, m2 / n

    def has_second_moments(self, block):
        """Whether a block's project-input covariance was captured (SECOND_MOMENTS=True)."""
        return f"{block}/cov_m2" in self.tensors

    def has_any_second_moments(self):
        """Whether any block's project-input covariance was captured."""
        return any(k.endswith("/cov_m2") for k in self.tensors)

    def block_moments(self, block, which="project"):
        """(n, mean, cov) of a block's project conv input (``"project"``, over positions) or of its pooled
        pre-gate SE input (``"se"``, one row per image), from a SECOND_MOMENTS=True capture."""
        if which not in ("project", "se"):
            raise PruneError(f"unknown moment {which!r}: use project or se")
        return self.moments(f"{block}/{'cov' if which == 'project' else 'se_cov'}")

    def std(self, layer):
        return self.var(layer).sqrt()

    def hist(self, layer):
        """Histogram of |a| per channel [C, NB] (int64)."""
        return self._get(f"{layer}/hist")

    def layer_counts(self, layer):
        """The layer's histogram summed over channels: counts per bin (float64)."""
        return self.hist(layer).sum(0).double()

    def _fraction_below(self, hist, threshold):
        edges = self.edges
        if hist.shape[-1] < 1 or edges.numel() != hist.shape[-1] + 1:
            raise PruneError(f"activation stats: {hist.shape[-1]} histogram bins but {edges.numel()} hist_edges")
        return deadness_from_hist(hist, edges.cpu(), threshold)

    def deadness(self, layer, threshold=None):
        """Per channel fraction of |a| < threshold: the exact count at the captured one, else the histogram."""
        captured = self.threshold
        threshold = captured if threshold is None else threshold
        if threshold is None:
            raise PruneError("deadness needs a THRESHOLD: the activation stats do not record one")
        if captured is not None and math.isclose(threshold, captured, rel_tol=1e-6):
            return self._get(f"{layer}/below").double() / self.elements(layer)
        return self._fraction_below(self.hist(layer), threshold)

    def neuron_deadness(self, layer):
        """Per neuron [C, H, W] fraction of images with |a| < the captured threshold."""
        return self._get(f"{layer}/neuron_below").double() / self._get(f"{layer}/n_images").double()

    def class_images(self, layer):
        """Images per class [K] counted for ``layer``."""
        return self._get(f"{layer}/n_class")

    def has_class_hist(self, layer):
        """Whether per-class histograms of ``layer`` were captured (PER_CLASS=histograms)."""
        return f"{layer}/hist_class" in self.tensors

    def has_any_class_hist(self):
        """Whether any layer's per-class histograms were captured."""
        return any(k.endswith("/hist_class") for k in self.tensors)

    def class_hist(self, layer):
        """Histograms of |a| per class and channel [K, C, NB] (int64; PER_CLASS=histograms captures)."""
        return self._get(f"{layer}/hist_class")

    def class_deadness(self, layer, threshold, min_class_samples):
        """Per-class deadness [K', C] at ``threshold`` over the classes with >= ``min_class_samples`` images."""
        if min_class_samples < 1:
            raise PruneError(f"MIN_CLASS_SAMPLES must be at least 1, not {min_class_samples}")
        dead = self._fraction_below(self.class_hist(layer), threshold)
        return dead[self.class_images(layer).to(dead.device) >= min_class_samples]

    def class_deadness_range(self, layer, threshold, min_class_samples):
        """(min, max) per channel of the per-class deadness; NaN when no class has enough images."""
        dead = self.class_deadness(layer, threshold, min_class_samples)
        if dead.shape[0] == 0:
            nan = torch.full(dead.shape[1:], math.nan, dtype=torch.float64, device=dead.device)
            return nan, nan
        return dead.amin(0), dead.amax(0)

    def _checked(self, key, shape, why):
        """``key`` as a CPU float64 tensor of ``shape``, or a PruneError naming it and ``why`` it is needed."""
        if key not in self.tensors:
            raise PruneError(f"statistics have no {key}: {why}")
        value = torch.as_tensor(self.tensors[key]).detach().to("cpu", torch.float64)
        if tuple(value.shape) != shape:
            raise PruneError(
                f"statistics {key} have shape {tuple(value.shape)}, expected {shape}: "
                "captured on another (or differently pruned) model?"
            )
        return value

    def project_input_moments(
        self, roles, why="compensation needs a CAPTURE_POINT=project_input capture of this model (before pruning)"
    ):
        """(mean, variance) per hidden channel (CPU float64) of a block's project conv input, shapes checked."""
        layer, c = roles["project"], (roles["hidden_channels"],)
        n = self._checked(f"{layer}/n", (), why)
        if n <= 0:
            raise PruneError(f"statistics {layer}/n is {int(n)}: the capture saw no activations of {layer}")
        mean = self._checked(f"{layer}/sum", c, why) / n
        var = (self._checked(f"{layer}/sum_sq", c, why) / n - mean**2).clamp_(min=0.0)
        return mean, var

    def pregate_mean(
        self,
        block,
        channels,
        why="compensation needs a CAPTURE_POINT=project_input capture of this model (before pruning)",
    ):
        """Per-channel mean (CPU float64) of a block's depthwise activation before the SE gate."""
        total = self._checked(f"{block}/pregate_sum", (channels,), why)
        n = self._checked(f"{block}/pregate_n", (), why)
        if n <= 0:
            raise PruneError(f"statistics {block}/pregate_n is 0: the capture saw no activations of block {block}")
        return total / n
