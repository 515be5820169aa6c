"""Streaming activation capture: hooks in a context manager, per-channel running totals, log-spaced histograms.

A pass over a whole data set keeps no feature maps: every captured tensor is reduced, on its own device and
under ``torch.inference_mode()``, into running totals whose size depends on the layer only, never on the
number of images. For every layer (a captured tensor; its key is a module name) the totals are:

=================  ==================  ==========================================================
``n``              int64 []            elements per channel counted (images x H x W)
``n_images``       int64 []            images seen
``below``          int64 [C]           count of |a| < threshold
``neuron_below``   int64 [C, H, W]     per neuron, images with |a| < threshold
``sum``            float64 [C]         sum of a
``sum_abs``        float64 [C]         sum of |a|
``sum_sq``         float64 [C]         sum of a**2
``max_abs``        float32 [C]         max of |a|
``n_class``        int64 [K]           images per class
``hist_class``     int64 [K, C, NB]    histogram of |a| per class (``per_class="histograms"``)
``hist``           int64 [C, NB]       histogram of |a| (``hist_class`` summed over classes by ``finalize``)
``sum_abs_class``  float64 [K, C]      sum of |a| per class (``per_class="counts"``: with ``n_class``, means)
=================  ==================  ==========================================================

``per_class`` (``PER_CLASS``) says what is kept per class: ``histograms`` (``hist_class``, K x C x NB: about
5 MB a class on Large), ``counts`` (``n_class`` and ``sum_abs_class``: per-class mean |a|, 123x less) or
``off`` (``n_class`` only); the overall ``hist`` is kept in every mode. ``per_class_bytes`` estimates the
cost of each mode before a capture.

Counts are int64, sums float64 (float32 stops counting exactly past 2**24). A batch is reduced per
channel in float32 over the batch, then in float64 over H x W (per-image sums: float32 over H x W), and
added into the float64 totals: each batch contributes a float32 rounding error (a few 1e-7 of its sum of
|a|), and nothing drifts over batches. The threshold is compared in float32. Every total of a captured
tensor comes from one compiled function, ``_batch_totals``, which inductor fuses into a loop or two that
read the tensor once (``fused.compiled``; eager where compiling is not available).

Per block, whatever the capture point, ``{block}/pregate_sum`` (float64 [C]) and ``{block}/pregate_n``
(int64 []) hold the per-channel sum and count of the depthwise activation's output before the SE gate
(``ActivationStats.pregate_mean``); in a block without SE that tensor is also the project conv's input, so
where it is captured (``project_input``, ``activation``) the layer's batch sums are reused instead of a
second hook. A NaN or inf in a captured tensor stops the capture with a PruneError naming the first such
layer in forward order; the check is free: NaN and inf propagate into the per-batch max |a| (an explicit
``isfinite(x).all()`` per tensor costs ~15% of inference).

With ``second_moments=True`` the state also holds Chan-merged moment triples ``{prefix}_n`` (int64 []),
``{prefix}_mean`` (float64 [C]) and ``{prefix}_m2`` (float64, centred scatter sum), see
``moments.capture_keys``: ``{layer}/chan_*`` (M2 [C], per-channel, every position: the variance without the
cancellation of ``sum_sq / n - mean**2``, from the same fused pass: each batch's squares are taken around
the running mean), ``{block}/cov_*`` (M2 [C, C], the project conv input of every
block with an expand conv, over positions) and ``{block}/se_cov_*`` (M2 [C, C], the pooled pre-gate SE
input, one row per image). Read them with ``ActivationStats.block_moments`` / ``.moments``; they
are not sums, so torchrun ranks merge them with ``moments.all_reduce_moments``.

Histogram bins are fixed (``hist_edges()``), identical for every layer and run: bin 0 holds exact zeros
(strictly, |a| < 2**-128, i.e. zeros and the tiniest float32 subnormals), bin 1 the underflow
(0 < |a| < 2**-20), then 2**SUB_BITS bins per octave from 2**-20 (~9.5e-7) to 2**10 (1024), then an
overflow bin (inf included). A value's bin is read off its float32 bit pattern (exponent and the top
SUB_BITS mantissa bits), so binning is exact at every edge. One ``scatter_add_`` per layer and batch counts
all classes, channels and bins at once, straight into the totals (``bincount`` would zero and add a
[K, C, NB] result every batch: about twice the cost); each batch is grouped by class first, so each
class's rows stay in cache. Live, ``hist_class`` is int32 while no bin can overflow (``finalize``: int64).
Counting is serial and costs about 2.5 ns an element on a CPU (a hand-written loop measured the same), a
sixth of plain inference at 64-128 px when every element is counted (``benchmarks/capture_overhead.py``,
RESULTS.md). So the histograms can be counted on a sample (``hist_positions_per_image``; the stages count
4): per layer and batch, that many positions are drawn from each image uniformly with replacement
(``moments.draw_positions``, seeded by the batch count; every position where an image has no more), and
each channel's |a| there is counted. Every image weighs the same in a layer's histogram, as in the full
count, so a channel's fraction of |a| below any threshold (deadness at another threshold, the threshold
curves) is an unbiased estimate of the full count's, and percentiles are read off that estimate; its counts
sum to images x positions drawn, not to ``n``. ``below``, ``neuron_below``, the sums and max |a| always count
every position: deadness at the captured threshold is exact either way. Per-class deadness is a minimum over
classes of small samples, which sampling would bias, so CLASS_AWARE captures count every position
(``measure.hist_positions``). Memory does not grow with the number of images.
"""

import contextlib
import math

import torch
from tqdm import tqdm

from . import fused, moments
from .activation_stats import check_threshold
from .blocks import capture_layer, check_capture_point
from .errors import PruneError
from .moments import seeded_generator

DEFAULT_THRESHOLD = 2.0**-7  # ~0.0078, a bin edge: histogram deadness then equals ``below`` (counting every position)
SUB_BITS = 2  # mantissa bits kept: 2**SUB_BITS histogram bins per octave
LOW_EXP, HIGH_EXP = -20, 10  # regular bins span [2**LOW_EXP, 2**HIGH_EXP), about 1e-6 .. 1e3
_SHIFT = 23 - SUB_BITS  # float32 bits >> _SHIFT = (biased exponent, top mantissa bits): monotone in |a|
_LO_KEY = (LOW_EXP + 127) << SUB_BITS
_HI_KEY = (HIGH_EXP + 127) << SUB_BITS
NUM_BINS = _HI_KEY - _LO_KEY + 3  # zero, underflow, regular bins, overflow
_INT32_MAX = 2**31 - 1
_HIST_SEED_OFFSET = 2**40  # the histogram positions' seed is the capture's seed plus this
_GATHER_BELOW = 16  # maps with fewer positions are histogrammed through the positions' gather (faster)
LAYER_STATS = ("n", "n_images", "below", "neuron_below", "sum", "sum_abs", "sum_sq", "max_abs", "n_class")
BLOCK_STATS = ("pregate_sum", "pregate_n")
GLOBAL_STATS = ("hist_edges", "threshold", "n_batches")
PER_CLASS_MODES = ("histograms", "counts", "off")
_PER_CLASS_STATS = {"histograms": ("hist_class",), "counts": ("hist", "sum_abs_class"), "off": ("hist",)}


def per_class_bytes(channels, num_classes, per_class):
    """Bytes the per-class totals of a capture take (``channels``: every captured layer's C), at finalize's
    int64 / float64 (live int32 histograms take half, but finalize makes the int64 copy)."""
    c = sum(channels)
    return {
        "histograms": 8 * num_classes * c * NUM_BINS,
        "counts": 8 * num_classes * c + 8 * c * NUM_BINS,
        "off": 8 * c * NUM_BINS,
    }[valid_per_class(per_class)]


def valid_per_class(per_class):
    """``per_class``, or a PruneError listing the valid ones."""
    if per_class not in PER_CLASS_MODES:
        raise PruneError(f"unknown PER_CLASS {per_class!r}: use auto or one of {', '.join(PER_CLASS_MODES)}")
    return per_class


def hist_edges():
    """The NUM_BINS + 1 bin edges (float64): bin i holds edges[i] <= |a| < edges[i + 1]; all exact in float32."""
    keys = torch.tensor([1] + list(range(_LO_KEY, _HI_KEY + 1)), dtype=torch.int32)
    inner = (keys << _SHIFT).view(torch.float32).double()
    return torch.cat([torch.zeros(1, dtype=torch.float64), inner, torch.full((1,), math.inf, dtype=torch.float64)])


def _bin_keys(abs_values):
    """Histogram bin + _LO_KEY - 1 (int32) of every element of a float32 tensor of magnitudes |a|."""
    key = abs_values.view(torch.int32) >> _SHIFT
    idx = key.clamp(_LO_KEY - 1, _HI_KEY)
    idx += key.clamp_(max=1)  # +1 unless zero: zero -> _LO_KEY - 1, underflow -> _LO_KEY, ...
    return idx


def bin_index(abs_values):
    """The histogram bin (int32) of every element of a float32 tensor of magnitudes |a|."""
    return _bin_keys(abs_values).sub_(_LO_KEY - 1)


def _hist_offsets(rows, channels):
    """Index of bin 0 of every (image, channel) in a flat [K, C, NUM_BINS] histogram: [B, 1, C] in the dtype of
    ``rows`` [B], each image's histogram row (its class, or 0 for one histogram of every class)."""
    channel = torch.arange(channels, dtype=rows.dtype, device=rows.device)
    return ((rows[:, None] * channels + channel) * NUM_BINS - (_LO_KEY - 1))[:, None, :]


def _batch_totals(x, threshold: float, rows, per_image: bool, shift, positions=None):
    """One batch [B, C, H, W] of a layer reduced per channel ({name: tensor}); compiled, a loop or two.

    Sums are float32 over the batch, then float64 over H x W. ``rows`` [B] (``_Accumulator._hist_rows``, int32
    or int64: the index's dtype): also ``idx``, the index into the flat histogram [K, C, NUM_BINS] (or [C,
    NUM_BINS], every row 0) of every element (image i counts into row ``rows[i]``; the offsets are computed in
    the kernel), or with ``positions`` [B, P] (flat positions per image) of the elements at those positions
    only (in [B, P, C] order). ``per_image``: also ``image_abs`` [B, C]. ``shift`` [C]: also ``dev`` and
    ``sq_dev``, the sums of a - shift and of its square (per-channel M2 without cancellation).
    """
    x = x.float()
    a = x.abs()
    totals = {
        "neuron_below": (a < threshold).sum(0, dtype=torch.int32),
        "sum": x.sum(0).double().sum((1, 2)),
        "sum_abs": a.sum(0).double().sum((1, 2)),
        "sum_sq": (a * a).sum(0).double().sum((1, 2)),
        "max_abs": a.amax(0).amax((1, 2)),  # NaN propagates: also the batch's non-finite check
    }
    if per_image:
        totals["image_abs"] = a.sum((2, 3)).double()
    if rows is not None:
        offsets = _hist_offsets(rows, x.shape[1])
        if positions is None:  # [B, C, H * W]: every position, in x's order
            counted, offsets = a.flatten(2), offsets.transpose(1, 2)
        else:  # [B, P, C], channels innermost: inductor's loop over a short P runs 4x slower. Gathered from
            # x: gathering from |x| would make inductor store the whole |x|
            counted = x.flatten(2).gather(2, positions[:, None, :].expand(-1, x.shape[1], -1)).transpose(1, 2).abs()
        totals["idx"] = _bin_keys(counted).to(offsets.dtype).add_(offsets).reshape(-1)
    if shift is not None:
        dev = x - shift[:, None, None]
        totals["dev"] = dev.sum(0).double().sum((1, 2))
        totals["sq_dev"] = (dev * dev).sum(0).double().sum((1, 2))
    return totals


_BATCH_TOTALS = fused.compiled(_batch_totals)


def _image_sums(x):
    """Per-image, per-channel sums [B, C] (float64; float32 over H x W) of [B, C, H, W]: one eager pass
    (compiled, a reduction over a few positions per row is slower)."""
    return x.float().sum((2, 3)).double()


def _block_layers(block, roles, capture_point):
    """[(module, hook kind, role)] of the tensors captured in one block."""
    if capture_point == "project_input":
        return [(roles["project"], "pre", "project")]
    if capture_point == "activation":
        dw = "depthwise_act" if "depthwise_act" in roles else "depthwise_bn"
        return [(roles[r], "post", r) for r in ("expand_act", dw) if r in roles]
    if capture_point == "conv_output":
        return [(roles[r], "post", r) for r in ("expand", "depthwise") if r in roles]
    check_capture_point(capture_point)


def describe_layers(blocks, capture_point="project_input"):
    """JSON-able {layer: {block, module, hook, role, proposal, channels}} of the captured tensors, in forward order.

    ``module`` is the hooked module (the layer key); ``hook`` says whether its input (``pre``) or its output
    (``post``) is captured; ``proposal`` marks the layer a block is scored on.
    """
    layers = {}
    for block, roles in blocks.items():
        proposal = capture_layer(roles, capture_point)
        for module, hook, role in _block_layers(block, roles, capture_point):
            layers[module] = {
                "block": block,
                "module": module,
                "hook": hook,
                "role": role,
                "proposal": module == proposal,
                "channels": roles["hidden_channels"],
            }
    return layers


def _pregate_module(roles):
    return roles.get("depthwise_act", roles["depthwise_bn"])


def _pregate_layer(roles, capture_point):
    """The captured layer whose tensor is the block's pre-gate activation, or None. Only in blocks without SE:
    in torchvision's ``InvertedResidual`` (the only block ``blocks.find_blocks`` accepts) nothing lies between
    the depthwise activation and the project conv there (the capture point ``activation`` captures the
    former, ``project_input`` the latter); with SE the pre-gate hook also feeds the pooled SE covariance its
    per-image sums."""
    if roles.get("se_fc1") or capture_point not in ("project_input", "activation"):
        return None
    return capture_layer(roles, capture_point)


def _register(module, kind, fn):
    """Hook ``fn`` on the module's input (``pre``) or output; the hook returns None, so it never alters them."""
    if kind == "pre":

        def pre_hook(mod, args):
            fn(args[0])

        return module.register_forward_pre_hook(pre_hook)

    def hook(mod, args, out):
        fn(out)

    return module.register_forward_hook(hook)


@contextlib.contextmanager
def attached_hooks(model, hooks):
    """Register ``(module name, "pre" | "post", fn(tensor))`` hooks in eval mode; always remove them on exit."""
    modules = dict(model.named_modules())
    handles, was_training = [], model.training
    try:
        model.eval()
        for name, kind, fn in hooks:
            if name not in modules:
                raise PruneError(
                    f"layer {name} is not a module of this {type(model).__name__}: blocks from another model?"
                )
            handles.append(_register(modules[name], kind, fn))
        yield
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)


def _zeros(shape, dtype, device):
    """Totals are normal tensors (not inference tensors), so they stay usable after the pass."""
    with torch.inference_mode(False):
        return torch.zeros(shape, dtype=dtype, device=device)


def _new_layer_totals(shape, num_classes, histograms, device, per_class="histograms"):
    c = shape[0]
    totals = {
        "n": ((), torch.int64),
        "n_images": ((), torch.int64),
        "below": ((c,), torch.int64),
        "neuron_below": (shape, torch.int64),
        "sum": ((c,), torch.float64),
        "sum_abs": ((c,), torch.float64),
        "sum_sq": ((c,), torch.float64),
        "max_abs": ((c,), torch.float32),
        "n_class": ((num_classes,), torch.int64),
    }
    if histograms and per_class == "histograms":
        totals["hist_class"] = ((num_classes, c, NUM_BINS), torch.int32)  # see _Accumulator._hist_class
    elif histograms:
        totals["hist"] = ((c, NUM_BINS), torch.int32)
    if histograms and per_class == "counts":
        totals["sum_abs_class"] = ((num_classes, c), torch.float64)
    return {stat: _zeros(s, dtype, device) for stat, (s, dtype) in totals.items()}


class _Accumulator:
    """Adds each captured tensor of the current batch into the running totals held in ``state``."""

    def __init__(
        self,
        state,
        threshold,
        num_classes,
        histograms,
        per_class="histograms",
        moments=None,
        hist_positions=None,
        seed=0,
        device="cpu",
    ):
        self.state, self.threshold, self.num_classes, self.histograms = state, threshold, num_classes, histograms
        self.per_class, self.moments = per_class, moments  # moments: a moments.CaptureMoments fed from each pass
        self.hist_positions = hist_positions
        self.generator = seeded_generator(seed + _HIST_SEED_OFFSET, device)  # a stream apart from the covariance's
        self.hist_key = "hist_class" if per_class == "histograms" else "hist"
        self.labels, self.class_counts, self.batch_max, self._rows = None, None, [], {}
        self._ones, self._counted = {}, {}
        self.pregate_of = {}  # captured layer -> the block whose pre-gate activation it is (see _hooks)

    def start_batch(self, labels):
        """Labels (on the model's device, grouped by class) of the batch about to run."""
        self.labels, self.batch_max, self._rows = labels, [], {}
        # not bincount: on a GPU it reads the labels' maximum back, waiting for the device every batch
        self.class_counts = torch.zeros(self.num_classes, dtype=torch.int64, device=labels.device)
        self.class_counts.index_add_(0, labels, torch.ones(labels.shape, dtype=torch.int64, device=labels.device))

    def _totals(self, layer, x):
        """``stat -> tensor`` of the layer's totals (made at its first batch), checked against ``x``'s shape."""
        if x.dim() != 4:
            raise PruneError(f"layer {layer}: captured tensor of shape {tuple(x.shape)}, expected (batch, C, H, W)")
        if f"{layer}/n" not in self.state:
            fresh = _new_layer_totals(tuple(x.shape[1:]), self.num_classes, self.histograms, x.device, self.per_class)
            self.state.update({f"{layer}/{stat}": t for stat, t in fresh.items()})
            self._counted[layer] = 0  # made now, empty: nothing to read back (_hist_class)
        shape = tuple(self.state[f"{layer}/neuron_below"].shape)
        if tuple(x.shape[1:]) != shape:
            raise PruneError(
                f"layer {layer}: captured tensor of shape {tuple(x.shape)}, expected (batch, *{shape}): "
                "all images of a capture (and of a resumed one) must have the same size"
            )
        return lambda stat: self.state[f"{layer}/{stat}"]

    def _hist_rows(self, channels):
        """Each image's row of the layer's flat histogram (its label in hist_class [K, C, NUM_BINS], 0 in hist
        [C, NUM_BINS]) as [B] int32, or int64 once K x C x NUM_BINS passes 2**31 - 1 (past about 18,000 classes
        on Large): the dtype of the histogram index ``_batch_totals`` computes from it."""
        rows_total = (self.num_classes if self.per_class == "histograms" else 1) * channels * NUM_BINS
        dtype = torch.int32 if rows_total <= _INT32_MAX else torch.int64
        if dtype not in self._rows:
            labels = self.labels if self.per_class == "histograms" else torch.zeros_like(self.labels)
            self._rows[dtype] = labels.to(dtype)
        return self._rows[dtype]

    def _hist_class(self, layer, elements):
        """The layer's hist_class before counting ``elements`` more per channel.

        Live, it is int32 (half the cache traffic of int64) while no bin can pass 2**31 - 1 (a bin never
        holds more than ``n``), int64 beyond; ``finalize`` always gives int64.
        """
        key = f"{layer}/{self.hist_key}"
        if layer not in self._counted:  # once per layer and capture: n may come from a resumed state
            self._counted[layer] = int(self.state[f"{layer}/n"])
        self._counted[layer] += elements
        dtype = torch.int32 if self._counted[layer] <= _INT32_MAX else torch.int64
        if self.state[key].dtype != dtype:
            with torch.inference_mode(False):
                self.state[key] = self.state[key].to(dtype)
        return self.state[key]

    def _hist_positions(self, images, positions, device):
        """[images, P] positions of each image the histograms count (``moments.draw_positions``), or None: every
        position. Maps of fewer than 16 positions are counted at all of them through the same gather (inductor's
        loop over every position in a map that small is the slow one)."""
        drawn = moments.draw_positions(images, positions, self.hist_positions, self.generator, device)
        if drawn is None and positions < _GATHER_BELOW:
            return torch.arange(positions, device=device).repeat(images, 1)  # contiguous, as a draw: the same graph
        return drawn

    def _count(self, hist, idx):
        """hist[idx] += 1 for every element of the int32 or int64 index (a contiguous source of ones is faster
        than expand)."""
        ones = self._ones.get(hist.dtype)
        if ones is None or ones.numel() < idx.numel() or ones.device != idx.device:
            ones = self._ones[hist.dtype] = torch.ones(idx.numel(), dtype=hist.dtype, device=idx.device)
        hist.view(-1).scatter_add_(0, idx, ones[: idx.numel()])  # 15-20% faster than index_add_ on a CPU

    def layer(self, layer, x):
        """Reduce one captured tensor [B, C, H, W] into its layer's totals (and second moments, if kept)."""
        total = self._totals(layer, x)
        b, c, h, w = x.shape
        hist = self._hist_class(layer, b * h * w) if self.histograms else None
        rows = self._hist_rows(c) if hist is not None else None
        positions = self._hist_positions(b, h * w, x.device) if hist is not None else None
        shift = self.moments.channel_shift(layer, x) if self.moments else None
        per_image = self.histograms and self.per_class == "counts"
        batch = _BATCH_TOTALS(x, self.threshold, rows, per_image, shift, positions)
        total("n").add_(b * h * w)
        total("n_images").add_(b)
        total("n_class").add_(self.class_counts)
        total("neuron_below").add_(batch["neuron_below"])
        total("below").add_(batch["neuron_below"].sum((1, 2)))
        torch.maximum(total("max_abs"), batch["max_abs"], out=total("max_abs"))
        self.batch_max.append((layer, batch["max_abs"]))
        for stat in ("sum", "sum_abs", "sum_sq"):
            total(stat).add_(batch[stat])
        if hist is not None:
            self._count(hist, batch["idx"])
        if "image_abs" in batch:
            total("sum_abs_class").index_add_(0, self.labels, batch["image_abs"])
        if layer in self.pregate_of:  # the block's pre-gate activation, not hooked twice (_pregate_layer)
            self._add_pregate(self.pregate_of[layer], batch["sum"], b * h * w)
        if self.moments:
            self.moments.channel(layer, b * h * w, batch["sum"], batch["dev"], batch["sq_dev"])
            self.moments.captured_project(layer, x, batch["sum"] / (b * h * w))

    def pregate(self, block, x):
        """Add the depthwise activation (before the SE gate) into the block's per-channel sum and count (and,
        with second moments, its per-image means into the pooled SE covariance)."""
        image_sums = _image_sums(x)
        self._add_pregate(block, image_sums.sum(0), x.numel() // x.shape[1])
        if self.moments:
            self.moments.pooled(block, image_sums, x.shape[2] * x.shape[3])

    def _add_pregate(self, block, total, n):
        if f"{block}/pregate_sum" not in self.state:
            self.state[f"{block}/pregate_sum"] = _zeros(total.shape, torch.float64, total.device)
            self.state[f"{block}/pregate_n"] = _zeros((), torch.int64, total.device)
        self.state[f"{block}/pregate_sum"].add_(total)
        self.state[f"{block}/pregate_n"].add_(n)

    def check_finite(self):
        """PruneError naming the first layer, in forward order, whose tensor held NaN or inf in this batch."""
        if not self.batch_max or bool(torch.isfinite(torch.cat([m for _, m in self.batch_max])).all()):
            return
        layer = next(name for name, m in self.batch_max if not bool(torch.isfinite(m).all()))
        raise PruneError(
            f"layer {layer}: NaN or inf in the captured activations "
            f"(batch {int(self.state['n_batches']) + 1}): check the model's weights and the input"
        )


def _hooks(acc, blocks, capture_point):
    """(module, kind, fn) for every captured layer and every block's pre-gate depthwise activation that is not
    a captured tensor (``_pregate_layer``: those are added from the layer's totals)."""
    hooks = [
        (name, info["hook"], lambda x, name=name: acc.layer(name, x))
        for name, info in describe_layers(blocks, capture_point).items()
    ]
    acc.pregate_of = {
        layer: block for block, roles in blocks.items() if (layer := _pregate_layer(roles, capture_point))
    }
    reused = set(acc.pregate_of.values())
    hooks += [
        (_pregate_module(roles), "post", lambda x, block=block: acc.pregate(block, x))
        for block, roles in blocks.items()
        if block not in reused
    ]
    return hooks


def expected_keys(blocks, capture_point, histograms=True, per_class="histograms", second_moments=False):
    """Every key of a capture's state (with per-class histograms, ``hist`` excluded: ``finalize`` adds it)."""
    stats = LAYER_STATS + (_PER_CLASS_STATS[valid_per_class(per_class)] if histograms else ())
    layers = describe_layers(blocks, capture_point)
    keys = {f"{layer}/{s}" for layer in layers for s in stats}
    keys |= moments.capture_keys(blocks, layers) if second_moments else set()
    return keys | {f"{block}/{s}" for block in blocks for s in BLOCK_STATS} | set(GLOBAL_STATS)


def _new_state(device, threshold):
    return {
        "hist_edges": hist_edges().to(device),
        "threshold": _zeros((), torch.float64, device).add_(threshold),
        "n_batches": _zeros((), torch.int64, device),
    }


def _resumed_state(state, keys, threshold, num_classes, device):
    """A private copy (on ``device``) of a previous capture's state, checked against this capture's settings."""
    given = {k for k in state if not (k.endswith("/hist") and k + "_class" in state)}
    if given != keys:
        odd = sorted(given ^ keys)[0]
        raise PruneError(
            f"resume state does not fit this capture: key {odd} is "
            f"{'extra' if odd in given else 'missing'} (other model, CAPTURE_POINT or histogram setting?)"
        )
    if float(state["threshold"]) != threshold:
        raise PruneError(f"resume state was captured at threshold {float(state['threshold'])}, not {threshold}")
    if not torch.equal(state["hist_edges"].cpu(), hist_edges()):
        raise PruneError("resume state has other histogram edges (made by another version of mbv3prune.capture)")
    some_layer = next(k for k in keys if k.endswith("/n_class"))
    if state[some_layer].numel() != num_classes:
        raise PruneError(f"resume state counts {state[some_layer].numel()} classes, not NUM_CLASSES={num_classes}")
    with torch.inference_mode(False):
        return {k: state[k].to(device, copy=True) for k in keys}


def _labels(labels, num_classes, device):
    """Labels as int64 on ``device``, each in [0, num_classes)."""
    labels = torch.as_tensor(labels)
    if labels.dim() != 1 or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise PruneError(f"labels must be a 1-d integer tensor, got {labels.dtype} of shape {tuple(labels.shape)}")
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if bad.numel():
        raise PruneError(f"label {int(bad[0])} is outside [0, {num_classes}): NUM_CLASSES too small?")
    return labels.to(device, torch.int64, non_blocking=True)


def _grouped_by_class(images, labels):
    """The batch reordered so that each class's images are adjacent: every total is a sum over images, so the
    order changes nothing, but each class's histogram rows then stay in cache while they are counted."""
    order = torch.argsort(labels, stable=True)
    return images[order], labels[order]


def _model_device(model, device):
    """The model's device, which must be ``device`` when one is given ("cuda" matches "cuda:0")."""
    model_device = next(model.parameters()).device
    want = torch.device(device) if device is not None else model_device
    if want.type != model_device.type or want.index not in (None, model_device.index):
        raise PruneError(f"the model is on {model_device}, not on DEVICE={device}: move it with model.to(device) first")
    return model_device


def _one_batch(model, acc, images, labels, device):
    """Forward one batch (grouped by class) with the hooks accumulating; a NaN or inf stops the capture."""
    images, labels = _grouped_by_class(images.to(device, non_blocking=True), labels)
    acc.start_batch(labels)
    model(images)
    acc.check_finite()
    if acc.moments:
        acc.moments.end_batch()
    acc.state["n_batches"].add_(1)


def capture(
    model,
    batches,
    blocks,
    capture_point="project_input",
    threshold=DEFAULT_THRESHOLD,
    num_classes=1,
    device=None,
    progress=True,
    state=None,
    histograms=True,
    on_batch=None,
    on_batch_every=1,
    per_class="histograms",
    second_moments=False,
    positions_per_image=None,
    hist_positions_per_image=None,
):
    """Run ``model`` over ``(images, labels)`` batches and return ``(stats, layers)``: running totals, no maps.

    ``stats`` is a dict of CPU tensors (see the module docstring; loads with ``torch.load(weights_only=True)``),
    ``layers`` the JSON-able ``describe_layers``. ``state``: a previous (partial) result to keep
    accumulating into; not modified. ``on_batch(i, state)`` runs after every ``on_batch_every``-th batch
    (``i`` counts all batches, resumed ones included, and is a multiple of ``on_batch_every``); ``state`` is
    live and complete (waiting covariance rows merged first): save ``finalize(state)``, never modify it.
    ``histograms=False`` skips ``hist_class`` (and ``hist``). ``per_class``: what is kept per class (see the
    module docstring). ``second_moments=True`` adds the moment triples of ``moments.capture_keys``
    (per-channel, project-input and pooled SE covariances; ``positions_per_image`` subsamples the
    project-input covariance, see ``moments.sampled_rows``). Under torchrun merge them with
    ``moments.all_reduce_moments``, never by summing. ``hist_positions_per_image``: positions of each image
    the histograms count (None or 0: every position; see the module docstring).
    """
    if on_batch_every < 1:
        raise PruneError(f"on_batch_every={on_batch_every} must be at least 1")
    device = _model_device(model, device)
    keys = expected_keys(blocks, capture_point, histograms, per_class, second_moments)
    threshold = check_threshold(threshold)
    state = (
        _resumed_state(state, keys, threshold, num_classes, device)
        if state is not None
        else _new_state(device, threshold)
    )
    layers = describe_layers(blocks, capture_point)
    seed = int(state["n_batches"])  # a resumed capture draws other positions than its first part
    moment_sink = (
        moments.CaptureMoments(state, blocks, layers, positions_per_image, seed, device) if second_moments else None
    )
    acc = _Accumulator(
        state, threshold, num_classes, histograms, per_class, moment_sink, hist_positions_per_image, seed, device
    )
    hooks = _hooks(acc, blocks, capture_point) + (moment_sink.hooks() if moment_sink else [])
    with attached_hooks(model, hooks), torch.inference_mode():
        batches = tqdm(batches, desc=f"capture {capture_point}", unit="batch", disable=None if progress else True)
        for i, (images, labels) in enumerate(batches, start=seed + 1):  # i: batches in the state, resumed included
            _one_batch(model, acc, images, _labels(labels, num_classes, device), device)
            if on_batch is not None and i % on_batch_every == 0:
                if moment_sink:
                    moment_sink.flush()
                on_batch(i, state)
    if moment_sink:
        moment_sink.flush()
    missing = sorted(keys - set(state))
    if missing:
        raise PruneError(f"capture saw no activations for {missing[0]}: no batches, or blocks from another model")
    return finalize(state, copy=False), layers


def finalize(state, copy=True):
    """Plain CPU tensors of a (live) capture state, with ``{layer}/hist`` summed from ``hist_class``.

    ``copy=False`` may return the state's own CPU tensors: only for a state that is no longer updated.
    """
    stats = {
        k: v.detach().to("cpu", copy=copy)
        for k, v in state.items()
        if not (k.endswith("/hist") and k + "_class" in state)
    }
    for key in [k for k in stats if k.endswith("/hist")]:
        stats[key] = stats[key].long()
    for key in [k for k in stats if k.endswith("/hist_class")]:
        stats[key] = stats[key].long()
        stats[key[: -len("_class")]] = stats[key].sum(0)
    return stats
