"""Streamed second moments: (n, mean, M2) merged Chan-style, so near-constant channels keep their variance.

Each batch of vectors z [rows, dim] is centred at its own mean and reduced to a Gram in the batch's dtype
(float32 BLAS for float32 activations), then merged into float64 running totals with Chan et al.'s update
(``merge_rows_`` adds the update's between-batch terms to the float32 Gram as one small product, then the
Gram to M2 in one float64 pass; it takes several batches at once, and can leave the Gram in a float32
staging buffer, which a capture uses to pay that pass once per ``FOLD_EVERY`` merges of at least
``FLUSH_ROWS`` rows instead of once per batch):

    n = na + nb,  delta = mean_b - mean_a,  mean = mean_a + delta * nb / n,
    M2 = M2a + M2b + outer(delta, delta[cols]) * na * nb / n.

``M2`` is the centred scatter sum (z - mean)(z[cols] - mean[cols])^T: [dim, dim] for plain second moments,
[dim, len(cols)] for cross moments (``cols`` = the trailing columns of z, e.g. z = [x, y] gives Cov(x, y)
and Cov(y, y) at once), or [dim] for per-channel variances only (``diagonal=True``). Since a batch is
centred before squaring, a channel whose mean is 1e4 times its std keeps its variance to float32 rounding
of the centred values (sum_sq / n - mean**2 would cancel it away). ``n`` is an int64 0-dim tensor.

A capture keeps a moment as three state tensors ``{prefix}_n``, ``{prefix}_mean`` and ``{prefix}_m2``
(``MOMENT_SUFFIXES``). They must NOT be summed across torchrun ranks: ``all_reduce_moments`` merges them
exactly (two all_reduce passes), and ``distributed.all_reduce_totals`` must leave them alone.
"""

import torch
import torch.distributed as dist

from .blocks import prunable
from .errors import PruneError

MOMENT_SUFFIXES = ("_n", "_mean", "_m2")


def _accumulate_device(device):
    """Where the float64 totals live: the data's device, except MPS (no float64) -> CPU."""
    device = torch.device(device)
    return torch.device("cpu") if device.type == "mps" else device


def batch_moments(z, cols=None, diagonal=False, mean=None, n=None, inplace=False):
    """(n, mean, M2) of the rows of ``z`` [rows, dim]: n a Python int (nothing to read back from a GPU), mean
    and M2 float64 tensors.

    ``cols``: number of trailing columns the scatter is taken against (None: all). ``diagonal``: per-column
    sum of squares only (M2 [dim]). Subsampling: pass the exact batch ``mean`` (over all ``n`` rows) with a
    random subset ``z`` of the rows; M2 is then the subset's scatter around that mean times n / rows, an
    unbiased estimate of the whole batch's scatter under simple random sampling of rows. ``inplace``: z is
    a scratch copy that may be centred in place (saves one copy of the batch).
    """
    zc, n, mean = centred(z, mean, n, inplace)
    m2 = (zc * zc).sum(0) if diagonal else zc.T @ (zc if cols is None else zc[:, zc.shape[1] - cols :])
    return n, mean, m2.to(mean)


def _outer(delta, m2):
    """outer(delta, delta[cols]) in the layout of ``m2`` ([dim], [dim, dim] or [dim, cols])."""
    if m2.dim() == 1:
        return delta * delta
    return delta[:, None] * delta[None, delta.numel() - m2.shape[1] :]


def merge_(n, mean, m2, bn, bmean, bm2, na=None):
    """Merge the moments (bn, bmean, bm2) into the running (n, mean, m2) in place (Chan et al.); returns them.

    ``bn`` may be a Python int; ``na``: the running count as a Python int when the caller tracks it (reading
    ``n`` on a GPU waits for the device).
    """
    na, nb = int(n) if na is None else na, int(bn)
    if nb == 0:  # nothing to add (an empty batch's mean is NaN)
        return n, mean, m2
    delta = bmean.to(mean) - mean
    m2.add_(bm2.to(m2))
    if m2.dim() == 1:
        m2.add_(delta * delta, alpha=na * nb / (na + nb))
    else:
        m2.addr_(delta, delta[delta.numel() - m2.shape[1] :], alpha=na * nb / (na + nb))
    mean.add_(delta, alpha=nb / (na + nb))
    n.add_(nb)
    return n, mean, m2


def centred(z, batch_mean=None, batch_n=None, inplace=False):
    """A batch of rows ``z`` [rows, dim] ready for ``merge_rows_``: ``(rows, n, mean)``.

    The rows are centred at the exact batch mean rounded to z's dtype (float32 for half precision) and, when
    they are a sample of the batch's ``batch_n`` rows, scaled by sqrt(batch_n / rows), so their scatter is
    ``batch_moments``' estimate. ``batch_mean`` / ``batch_n`` and ``inplace`` as in ``batch_moments``; the
    rows returned never share memory with ``z`` unless ``inplace``.
    """
    if z.dtype in (torch.float16, torch.bfloat16):
        z = z.float()  # the Gram and the between-batch terms would overflow in half precision
    rows = z.shape[0]
    if batch_mean is None:
        batch_mean, batch_n = z.mean(0), rows
    batch_mean = batch_mean.to(_accumulate_device(z.device), torch.float64)
    zc = z.sub_(batch_mean.to(z)) if inplace else z - batch_mean.to(z)
    if rows and rows != batch_n:
        zc.mul_((batch_n / rows) ** 0.5)  # the sample's scatter times n / rows (see batch_moments)
    return zc, int(batch_n), batch_mean


def merge_rows_(n, mean, m2, batches, staged=None, na=None):
    """Merge ``centred`` batches into the running (n, mean, m2) in place, in one Gram; returns them.

    The scatter of the union around its new mean is each batch's scatter around its own mean plus the
    between-group term sum_g n_g (mean_g - mean)(mean_g - mean)^T over the batches and the running moments
    (Chan et al.'s update, for several groups at once). Those terms enter the Gram as a small matrix of one
    row per group, sqrt(n_g) (mean_g - mean), and the rounding of each batch's centre to z's dtype (c_b, not
    mean_b) as a row subtracted, sqrt(n_b) (mean_b - c_b), so one Gram per call covers however many
    batches (a single batch's rows are not copied). ``m2``'s shape says what is
    kept: [dim, dim], or [dim, cols] for the scatter against z's trailing columns. ``staged`` (a
    ``staging`` buffer): the Gram is added there instead, by BLAS in place, and ``m2`` is complete only after
    ``fold_(m2, staged)`` (n and mean are updated at once either way). ``na``: the running count as a Python
    int when the caller tracks it (as in ``merge_``).
    """
    batches = [b for b in batches if b[1]]
    if not batches:
        return n, mean, m2
    z = batches[0][0] if len(batches) == 1 else torch.cat([zc for zc, _, _ in batches])
    counts = [int(n) if na is None else na] + [nb for _, nb, _ in batches]
    means = torch.stack([mean] + [bm.to(mean) for _, _, bm in batches])  # float64 [groups, dim], where m2 lives
    weights = _host_tensor(counts, mean.device)
    new_mean = (weights[:, None] * means).sum(0) / weights.sum()
    between = (means - new_mean) * weights.sqrt()[:, None]  # a group of 0 rows (empty running moments) adds 0
    rounding = torch.stack([(bm - bm.to(z.dtype).to(bm)) * nb**0.5 for _, nb, bm in batches])
    small, signed = torch.cat([between, rounding]).to(z), torch.cat([between, -rounding]).to(z)
    if staged is None:
        fold_(m2, _stage_gram_(staging(m2, z), z, small, signed))
    else:
        _stage_gram_(staged, z, small, signed)
    mean.copy_(new_mean)
    n.add_(sum(counts[1:]))
    return n, mean, m2


def _host_tensor(values, device):
    """float64 ``values`` on ``device`` without waiting for it (a plain copy to a GPU synchronises)."""
    return torch.tensor(values, dtype=torch.float64).to(device, non_blocking=True)


def staging(m2, z):
    """A zeroed buffer in z's dtype and device, of ``m2``'s shape, that Grams are added into (``merge_rows_``)."""
    return torch.zeros(m2.shape, dtype=z.dtype, device=z.device)


def _stage_gram_(staged, z, small, signed, panel=256):
    """staged += z^T z + signed^T small in place (against the trailing columns when staged is [dim, cols]);
    returns staged. When it is square and wider than ``panel``, only the panels on and below the diagonal
    are multiplied (63% of the work at 960): ``fold_`` reads its lower triangle only."""
    dim, cols = z.shape[1], staged.shape[1]
    if cols != dim or dim <= panel:
        col = slice(dim - cols, None)
        staged.addmm_(z.T, z[:, col]).addmm_(signed.T, small[:, col])
        return staged
    for i in range(0, dim, panel):
        rows, col = slice(i, i + panel), slice(None, i + panel)
        staged[rows, col].addmm_(z[:, rows].T, z[:, col]).addmm_(signed[:, rows].T, small[:, col])
    return staged


def fold_(m2, staged):
    """m2 += the Grams added into ``staged`` (a square one mirrored from its lower triangle), in float64 on
    m2's device; staged is zeroed."""
    if m2.dim() == 2 and m2.shape[0] == m2.shape[1]:
        gram = staged.tril()
        gram += staged.tril(-1).T  # the two parts do not overlap: exact
    else:
        gram = staged
    m2.add_(gram.to(m2.device))  # moved in float32 (MPS has no float64), added in float64
    staged.zero_()


def add_rows_(n, mean, m2, z, batch_mean=None, batch_n=None, inplace=False, na=None):
    """Merge the rows of ``z`` [rows, dim] into the running (n, mean, m2) in place; returns them.

    The same result as ``merge_(n, mean, m2, *batch_moments(z, ...))`` with one float64 pass over ``m2``
    instead of four (``centred`` then ``merge_rows_``; cross moments where ``m2`` is [dim, cols]).
    ``batch_mean`` / ``batch_n`` (the exact mean and count when ``z`` is a sample of the rows) and
    ``inplace`` as in ``batch_moments``, ``na`` as in ``merge_``.
    """
    return merge_rows_(n, mean, m2, [centred(z, batch_mean, batch_n, inplace)], na=na)


def zeros(dim, cols=None, diagonal=False, device="cpu"):
    """Empty running moments (n, mean, M2) for vectors of ``dim`` (see ``batch_moments`` for cols, diagonal)."""
    device = _accumulate_device(device)
    shape = (dim,) if diagonal else (dim, dim if cols is None else cols)
    return (
        torch.zeros((), dtype=torch.int64, device=device),
        torch.zeros(dim, dtype=torch.float64, device=device),
        torch.zeros(shape, dtype=torch.float64, device=device),
    )


class Moments:
    """Running moments of streamed rows: ``add(z)`` per batch, then ``n``, ``mean`` and ``cov()`` (M2 / n)."""

    def __init__(self, dim, cols=None, diagonal=False, device="cpu"):
        self.diagonal = diagonal  # the cross-moment columns live in m2's shape
        self.n, self.mean, self.m2 = zeros(dim, cols, diagonal, device)
        self.rows = 0  # n on the host: reading n off a GPU at every batch would wait for it

    def add(self, z):
        """Merge the rows of ``z`` [rows, dim] in; returns self."""
        if self.diagonal:
            merge_(self.n, self.mean, self.m2, *batch_moments(z, diagonal=True), na=self.rows)
        else:
            add_rows_(self.n, self.mean, self.m2, z, na=self.rows)
        self.rows += len(z)
        return self

    def cov(self):
        """M2 / n (float64): the population covariance (or cross-covariance, or per-channel variance)."""
        if self.rows == 0:
            raise PruneError("moments of no rows: no batches were seen")
        return self.m2 / self.n.double()

    def all_reduce(self):
        """Merge every torchrun rank's moments exactly into each (no-op without a process group); returns self."""
        all_reduce_(self.n, self.mean, self.m2)
        self.rows = int(self.n)
        return self


def rows_of(x):
    """A captured [B, C, H, W] (or [B, C]) tensor as [B * H * W, C] rows (one per position)."""
    if x.dim() == 2:
        return x
    return x.transpose(0, 1).reshape(x.shape[1], -1).T


def _comm_device(tensor):
    """gloo reduces CPU tensors, NCCL CUDA ones."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_(n, mean, m2):
    """Exact merge of (n, mean, M2) over all torchrun ranks, in place: pass 1 sums n and n * mean, pass 2 sums
    M2 + n_r outer(mean_r - mean, ...). No-op without an initialised process group. Returns (n, mean, m2)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return n, mean, m2
    dev = _comm_device(mean)
    first = torch.cat([n.double().reshape(1), n.double() * mean]).to(dev)
    dist.all_reduce(first)
    total = first[0].to(mean)
    global_mean = (first[1:].to(mean) / total) if float(total) > 0 else torch.zeros_like(mean)
    delta = mean - global_mean
    second = (m2 + _outer(delta, m2) * n.double()).to(dev)
    dist.all_reduce(second)
    m2.copy_(second.to(m2))
    mean.copy_(global_mean)
    n.copy_(total.round().to(n.dtype))
    return n, mean, m2


def moment_prefixes(stats):
    """Prefixes p with ``p_n``, ``p_mean`` and ``p_m2`` all in ``stats``, sorted."""
    return sorted(
        k[: -len("_m2")] for k in stats if k.endswith("_m2") and f"{k[:-3]}_n" in stats and f"{k[:-3]}_mean" in stats
    )


def all_reduce_moments(stats):
    """Merge every moment triple of a finalized capture ``stats`` across torchrun ranks, in place; returns stats.

    Sorted prefixes, so every rank reduces the same tensors in the same order.
    """
    for p in moment_prefixes(stats):
        all_reduce_(stats[f"{p}_n"], stats[f"{p}_mean"], stats[f"{p}_m2"])
    return stats


# ----------------------------------------------------------------------------------------------------------
# capture integration: the hooks and state keys of ``capture(..., second_moments=True)``


def _state_moments(state, prefix, dim, cols=None, diagonal=False, device="cpu"):
    """The live (n, mean, m2) state tensors of ``prefix``, made (outside inference mode) at first use."""
    if f"{prefix}_m2" not in state:
        with torch.inference_mode(False):
            fresh = zeros(dim, cols, diagonal, device)
        state.update({f"{prefix}{s}": t for s, t in zip(MOMENT_SUFFIXES, fresh)})
    return tuple(state[f"{prefix}{s}"] for s in MOMENT_SUFFIXES)


def seeded_generator(seed, device="cpu"):
    """A seeded generator on ``device``, so positions are drawn where the activations are (no host copy and no
    synchronisation per layer on a GPU); MPS draws on the CPU."""
    device = _accumulate_device(device)
    return torch.Generator(device=device).manual_seed(seed)


def draw_positions(images, positions, per_image, generator, device):
    """[images, per_image] flat positions drawn uniformly with replacement from each image's ``positions``
    (seeded ``generator``, drawn on its device), or None (every position) when ``per_image`` is 0 / None or an
    image has no more positions than that."""
    if not per_image or positions <= per_image:
        return None
    drawn = torch.randint(positions, (images, per_image), generator=generator, device=generator.device)
    return drawn.to(device)


def sampled_rows(x, per_image, generator, mean=None):
    """(exact batch mean or None, rows for the scatter, n) of a [B, C, H, W] (or [rows, C]) tensor ``x``.

    All n = B * H * W positions as rows, or, when an image has more than ``per_image`` positions, that many
    drawn uniformly with replacement from each image (seeded ``generator``), gathered without copying the
    batch. Every image is a stratum of the same size H * W sampled equally, so with the exact batch mean
    and n, ``batch_moments``' scaling of the drawn rows' scatter by n / rows (= H * W / per_image) is the
    stratified Hansen-Hurwitz estimator: unbiased for the batch's scatter sum (the mean itself stays exact).
    ``mean``: the batch's per-channel mean when the caller already has it (returned as given).
    """
    n = x.shape[0] if x.dim() == 2 else x.numel() // x.shape[1]
    pos = None if x.dim() == 2 else draw_positions(x.shape[0], x.shape[2] * x.shape[3], per_image, generator, x.device)
    if pos is None:
        return mean, rows_of(x), n
    b, c = x.shape[:2]
    picked = x.flatten(2).gather(2, pos[:, None, :].expand(b, c, per_image))  # [B, C, per_image]
    mean = x.sum(0).sum((1, 2)) / n if mean is None else mean
    return mean, picked.transpose(1, 2).reshape(b * per_image, c), n


class CaptureMoments:
    """Streams second moments into a capture's ``state`` (see ``capture_keys`` for what and where).

    The capture's pass feeds it (``capture._Accumulator``): ``channel`` with each captured layer's batch
    totals, ``captured_project`` with each captured tensor (used when it is a project conv input) and
    ``pooled`` with the pre-gate depthwise activation's per-image sums; ``hooks`` adds the project conv
    inputs that are not captured layers. ``positions_per_image``: positions of each image a project-input
    covariance is estimated on (None or 0: every position; see ``sampled_rows``); the means and the
    per-channel moments always use every position.

    Covariance rows wait, centred, until a prefix has ``FLUSH_ROWS`` of them at the end of a batch
    (``end_batch``), then merge in one Gram (``merge_rows_``), which BLAS adds in place into a float32
    staging buffer of the covariance's shape; every ``FOLD_EVERY`` merges the buffer is added into the
    float64 M2 (``fold_``): per batch, that pass over the 960 x 960 totals cost more than the Gram itself,
    and once per merge it still cost 40% on top of the Grams. A batch with ``FLUSH_ROWS`` rows of its own
    (every position) merges at once, so fewer than twice that many rows per covariance are ever held (at
    most 37 MB for Large; the staging buffers take 25 MB more). ``flush()`` merges whatever waits and folds
    every buffer; the state is complete only after it (``capture`` flushes before ``on_batch`` and at the
    end). Flushing or folding earlier or later changes the result only by float rounding (float32 sums of
    at most ``FOLD_EVERY`` Grams, each already a float32 sum of its rows).

    Every count it needs (rows merged so far, rows waiting) is kept as a Python int, read from the state once
    per moment and capture: on a GPU, reading a count off the device per layer would wait for the device
    every time, so the host could no longer queue work ahead of it.
    """

    FLUSH_ROWS = 512  # rows a covariance collects before they are merged (memory: 4 bytes x rows x dim)
    FOLD_EVERY = 8  # merges a covariance's float32 staging buffer sums before it is added into the float64 M2

    def __init__(self, state, blocks, layers, positions_per_image=None, seed=0, device="cpu"):
        self.state, self.layers = state, layers
        self.positions_per_image = positions_per_image
        self.generator = seeded_generator(seed, device)
        prunable_blocks = {block: roles for block, roles in blocks.items() if prunable(roles)}
        self.project_block = {roles["project"]: block for block, roles in prunable_blocks.items()}
        self.se_blocks = {block for block, roles in prunable_blocks.items() if roles.get("se_fc1")}
        self.pending = {}  # prefix -> [centred batches waiting to be merged]
        self.staged = {}  # prefix -> [float32 buffer of merged Grams not yet in M2, merges in it]
        self.counts = {}  # prefix -> rows merged into its moments so far (the state's {prefix}_n, on the host)

    def _count(self, prefix):
        """Rows merged into a moment so far: its state's ``_n`` read once (a resumed capture), then tracked."""
        if prefix not in self.counts:
            n = self.state.get(f"{prefix}_n")
            self.counts[prefix] = int(n) if n is not None else 0
        return self.counts[prefix]

    def channel_shift(self, layer, x):
        """What a layer's batch is centred at for its per-channel M2 (float32 [C]): the running mean, or at
        the first batch the first image's mean, so that the shifted values are of the order of the spread."""
        if self._count(f"{layer}/chan"):
            return self.state[f"{layer}/chan_mean"].to(x.device, torch.float32)
        return x[0].float().mean((1, 2))

    def channel(self, layer, n, total, dev, sq_dev):
        """Merge a layer's batch: ``n`` values per channel summing to ``total``, whose deviations from the
        batch's shift sum to ``dev`` and their squares to ``sq_dev``: M2 = sq_dev - dev**2 / n."""
        mean = total / n
        m2 = (sq_dev - dev * dev / n).clamp_(min=0)
        acc, prefix = _accumulate_device(mean.device), f"{layer}/chan"
        running = _state_moments(self.state, prefix, mean.numel(), diagonal=True, device=acc)
        merge_(*running, n, mean.to(acc), m2.to(acc), na=self._count(prefix))
        self.counts[prefix] += n

    def captured_project(self, layer, x, mean):
        """A captured tensor with its exact per-channel batch mean: merged if it is a project conv input."""
        if self.layers[layer]["hook"] == "pre" and layer in self.project_block:
            self.project(self.project_block[layer], x, mean)

    def project(self, block, x, mean=None):
        """Covariance of the project conv input over (sampled) positions."""
        mean, rows, n = sampled_rows(x.float(), self.positions_per_image, self.generator, mean)
        scratch = rows.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()  # a copy, not x's memory
        self._add(f"{block}/cov", centred(rows, mean, n, inplace=scratch))

    def pooled(self, block, image_sums, positions):
        """Covariance of the pooled pre-gate SE input, one row per image: ``image_sums`` [images, C] over
        ``positions`` each (blocks without SE: nothing to do)."""
        if block in self.se_blocks:
            self._add(f"{block}/se_cov", centred((image_sums / positions).float(), inplace=True))

    def _add(self, prefix, batch):
        if f"{prefix}_m2" not in self.state:
            self.counts[prefix] = 0  # made now, empty: nothing to read back
        _state_moments(self.state, prefix, batch[0].shape[1], device=batch[0].device)  # the keys exist from now
        self.pending.setdefault(prefix, []).append(batch)
        if len(batch[0]) >= self.FLUSH_ROWS:  # large enough alone (every position): merged now, never held
            self.flush_one(prefix)

    def flush_one(self, prefix):
        """Merge the waiting rows of one covariance (their Gram into its staging buffer; folded into M2 every
        ``FOLD_EVERY`` merges)."""
        n, mean, m2 = _state_moments(self.state, prefix, 0)
        batches = self.pending.pop(prefix, [])
        if not batches:
            return
        if prefix not in self.staged:
            with torch.inference_mode(False):  # usable after the capture's inference mode, like the state
                self.staged[prefix] = [staging(m2, batches[0][0]), 0]
        entry = self.staged[prefix]
        merge_rows_(n, mean, m2, batches, entry[0], na=self._count(prefix))
        self.counts[prefix] += sum(nb for _, nb, _ in batches)
        entry[1] += 1
        if entry[1] >= self.FOLD_EVERY:
            self.fold(prefix)

    def fold(self, prefix):
        """Add one covariance's staged Grams into its float64 M2."""
        entry = self.staged.get(prefix)
        if entry and entry[1]:
            fold_(self.state[f"{prefix}_m2"], entry[0])
            entry[1] = 0

    def flush(self, rows=0):
        """Merge the waiting rows of every covariance with at least ``rows`` of them; ``rows=0``: merge all
        and fold every staging buffer, so the state is complete."""
        for prefix in list(self.pending):
            if sum(len(z) for z, _, _ in self.pending[prefix]) >= rows:
                self.flush_one(prefix)
        if not rows:
            for prefix in self.staged:
                self.fold(prefix)

    def end_batch(self):
        """After a batch's forward pass: merge the covariances that have collected ``FLUSH_ROWS`` rows (between
        passes, where their Grams do not evict the forward's data from the caches)."""
        self.flush(self.FLUSH_ROWS)

    def hooks(self):
        """(module, "pre", fn) for the project conv inputs that are not captured layers."""
        captured = {name for name, info in self.layers.items() if info["hook"] == "pre"}
        return [
            (module, "pre", lambda x, block=block: self.project(block, x))
            for module, block in self.project_block.items()
            if module not in captured
        ]


def capture_keys(blocks, layers):
    """The state keys a ``second_moments=True`` capture adds (moment triples ``p_n``, ``p_mean``, ``p_m2``):

    * ``{layer}/chan_*`` for every captured layer: per-channel n, mean [C], M2 [C] over every position;
    * ``{block}/cov_*`` for every block with an expand conv: its project conv input over positions,
      mean [C] and M2 [C, C] (``ActivationStats.block_moments(block, "project")``);
    * ``{block}/se_cov_*`` for such blocks with SE: the pooled pre-gate depthwise activation, one row per
      image, mean [C] and M2 [C, C] (``ActivationStats.block_moments(block, "se")``).
    """
    prefixes = [f"{layer}/chan" for layer in layers]
    for block, roles in blocks.items():
        if prunable(roles):
            prefixes.append(f"{block}/cov")
            if roles.get("se_fc1"):
                prefixes.append(f"{block}/se_cov")
    return {p + s for p in prefixes for s in MOMENT_SUFFIXES}
