"""Reading the captured |activation| histograms: percentiles, threshold-sensitivity curves, suggested thresholds.

Everything here works from the saved statistics, so a new THRESHOLD is tried in seconds, without another
pass over the images (to the histogram's resolution: 4 bins per octave).
"""

import torch

from .activation_stats import ActivationStats

PERCENTILES = (1, 5, 25, 50, 75, 95, 99)


def layer_counts(stats, layer):
    """The layer's histogram summed over channels: counts per bin (float64)."""
    return ActivationStats.of(stats).layer_counts(layer)


def percentiles(counts, edges, ps=PERCENTILES):
    """{p: upper edge of the bin holding the p-th percentile of |a|} (0 for the exact-zero bin)."""
    cum = counts.cumsum(0) / counts.sum().clamp(min=1)
    out = {}
    for p in ps:
        k = int(torch.searchsorted(cum, torch.tensor(p / 100, dtype=cum.dtype)))
        out[p] = 0.0 if k == 0 else float(edges[min(k + 1, len(edges) - 2)])
    return out


def sensitivity(stats, layer, edges, deadness_threshold):
    """(fraction of activations below each regular edge, fraction of channels with deadness > D at each edge)."""
    hist = ActivationStats.of(stats).hist(layer).double()
    cum = hist.cumsum(1) / hist.sum(1, keepdim=True).clamp(min=1)  # [C, NB]: fraction below edges[k + 1]
    below = cum.mean(0)  # every channel counts elements equally (n per channel is the same)
    channels = (cum > deadness_threshold).double().mean(0)
    regular = slice(1, len(edges) - 2)  # upper edges edges[2] .. edges[-2]
    return below[regular], channels[regular]


def thresholds_axis(edges):
    """The thresholds the sensitivity curves are evaluated at (the regular bins' upper edges)."""
    return edges[2:-1]


def suggest(stats, layers, edges, fraction_of_median=0.01):
    """Per layer: the 5th percentile and ``fraction_of_median`` x the median |a|; a global suggestion too.

    A fixed threshold means different things in layers of different scale; 1% of a layer's median is a
    scale-aware alternative. The global suggestion is the median over layers of that value.
    """
    per_layer = {}
    for layer in layers:
        pct = percentiles(layer_counts(stats, layer), edges)
        per_layer[layer] = {"p5": pct[5], "one_percent_of_median": fraction_of_median * pct[50]}
    values = sorted(v["one_percent_of_median"] for v in per_layer.values())
    return per_layer, (values[len(values) // 2] if values else None)
