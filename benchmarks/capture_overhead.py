"""What streaming activation capture costs over plain inference, and that its memory does not grow with images.

On the same preloaded, warmed-up images, with the same thread count, it times mobilenet_v3_large (random
weights, BN statistics re-estimated on the images so activations have realistic magnitudes) at each
image size: plain inference, capture without histograms (``histograms=False``), capture with histograms
counted on HIST_POSITIONS_PER_IMAGE positions drawn per image (the stages' default) and on every position,
the former with the per-batch reductions run eagerly (what ``fused.compiled`` saves), with everything plus
second moments (``second_moments=True``: per-channel, project-input and pooled-SE covariances) with the
stages' sampling (COV_POSITIONS_PER_IMAGE and HIST_POSITIONS_PER_IMAGE positions per image) and on every
position, and plain inference with an explicit ``torch.isfinite(x).all()`` on every captured tensor (the
check that capture replaces by a free one: NaN and inf propagate into the per-batch max |a|). With
``ABLATIONS=True`` the second-moments capture is also timed with its covariance Grams skipped and with no
project-input covariance at all (a cost breakdown: those statistics are wrong). Labels come in class order
across batches, as the stages read a stratified sample (``CLASS_ORDER=False``: random labels, every class
in every batch). Rounds are interleaved; each variant's ratio to plain inference is taken within a round,
and the median and quartiles over rounds are reported (a shared machine's speed drifts between rounds).
Minor page faults per batch are printed beside each variant: like every script, this one keeps glibc's heap
(``mbv3prune.heap``), so they should be 0; on a VM a fault costs microseconds, and with glibc's defaults the
plain inference itself faulted on its activations every batch, and ran at 30 or 22 ms a batch at 64 px
depending on what the process had freed before (RESULTS.md). On a GPU (``DEVICE=auto`` finds it) the model
and the preloaded images are moved there and every pass is timed synchronised. Then it reports the
process's peak RSS after a short capture and after a long one (on the CPU): equal when no feature map is
kept.

    python -m benchmarks.capture_overhead
    python -m benchmarks.capture_overhead --SIZES=[64] --ROUNDS=5 --THREADS=1
    python -m benchmarks.capture_overhead --SIZES=[64] --ABLATIONS=True --MEMORY_BATCHES=[]

Targets on CPU at the default thread count: <= 1.25x without histograms, <= 1.5x with everything, <= 1.6x
with second moments. Measured figures are in RESULTS.md ("Capture cost").
"""

import resource
import time

import torch
import torchvision

from mbv3prune import capture as C
from mbv3prune import config, models
from mbv3prune import moments as M
from mbv3prune.blocks import find_blocks
from mbv3prune.capture import attached_hooks, capture, describe_layers
from mbv3prune.timing import synchronizer

# ---
ARCH = "mobilenet_v3_large"  # torchvision model timed
SIZES = [64, 128]  # image sizes (px) timed
BATCH = 32  # images per batch
N_BATCHES = 10  # batches per timed pass (the per-pass setup and finalize is included)
NUM_CLASSES = 12  # classes of the labels (size of the per-class histograms)
CLASS_ORDER = True  # labels in class order across batches, as the stages read them (False: random)
ROUNDS = 9  # interleaved timing rounds; medians and quartiles over them are reported
THREADS = 0  # torch threads (0: torch's default, the targets' setting; 1 keeps CPU time meaningful)
CAPTURE_POINT = "project_input"  # tensors captured
COV_POSITIONS_PER_IMAGE = 4  # positions per image the sampled variants' covariances use (the stages' default)
HIST_POSITIONS_PER_IMAGE = 4  # positions per image the sampled variants' histograms count (the stages' default)
MEMORY_BATCHES = [2, 16]  # short and long capture for the peak-RSS check
SEED = 0  # seeds the weights, images and labels
DEVICE = "auto"  # where the overhead is timed: auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps
ABLATIONS = False  # also time the second-moments capture with parts switched off: where its cost goes
# ---


def make_batches(size, n, gen):
    """``n`` batches of random images; labels in class order over all of them (CLASS_ORDER) or random."""
    if CLASS_ORDER:
        labels = (torch.arange(n * BATCH) * NUM_CLASSES // (n * BATCH)).view(n, BATCH)
    else:
        labels = torch.randint(0, NUM_CLASSES, (n, BATCH), generator=gen)
    return [(torch.randn(BATCH, 3, size, size, generator=gen), labels[i]) for i in range(n)]


def calibrated_model(batches):
    """Random-weight model whose BN statistics come from ``batches`` (realistic activation magnitudes)."""
    model = getattr(torchvision.models, ARCH)(num_classes=NUM_CLASSES)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # cumulative average
    model.train()
    with torch.no_grad():
        for images, _ in batches:
            model(images)
    return model.eval()


def plain(model, batches):
    with torch.inference_mode():
        for images, _ in batches:
            model(images)


def isfinite_checked(model, batches, blocks):
    hooks = [
        (name, info["hook"], lambda x: bool(torch.isfinite(x).all()))
        for name, info in describe_layers(blocks, CAPTURE_POINT).items()
    ]
    with attached_hooks(model, hooks):
        plain(model, batches)


def replaced_capture(model, batches, blocks, owner, name, replacement, **kw):
    """``capture``'s result with ``owner.name`` replaced for its duration: the per-batch reductions run eagerly
    (as where torch.compile is not available), or a part switched off for a cost breakdown (ABLATIONS; its
    statistics are then not the capture's)."""
    original = getattr(owner, name)
    setattr(owner, name, replacement)
    try:
        return capture(model, batches, blocks, **kw)
    finally:
        setattr(owner, name, original)


def _no_project_covariance(sink, block, x, mean=None):
    """``CaptureMoments.project`` that only makes the covariance's (zero) state keys: no rows, no Grams."""
    M._state_moments(sink.state, f"{block}/cov", x.shape[1], device=x.device)


DEFAULT_VARIANT = f"histograms, {HIST_POSITIONS_PER_IMAGE} pos/image"  # the capture stages' histograms
MOMENTS_VARIANT = f"+ 2nd moments, {COV_POSITIONS_PER_IMAGE} pos/image"  # ... with the stages' second moments


def variants(model, blocks):
    kw = dict(capture_point=CAPTURE_POINT, num_classes=NUM_CLASSES, progress=False)
    sampled = dict(kw, hist_positions_per_image=HIST_POSITIONS_PER_IMAGE)
    moments_kw = dict(sampled, second_moments=True, positions_per_image=COV_POSITIONS_PER_IMAGE)
    return {
        "plain": lambda b: plain(model, b),
        "capture, no histograms": lambda b: capture(model, b, blocks, histograms=False, **kw),
        DEFAULT_VARIANT: lambda b: capture(model, b, blocks, **sampled),
        "histograms, every pos.": lambda b: capture(model, b, blocks, **kw),
        f"... {HIST_POSITIONS_PER_IMAGE} pos/image, reduced eagerly": lambda b: replaced_capture(
            model, b, blocks, C, "_BATCH_TOTALS", C._batch_totals, **sampled
        ),
        MOMENTS_VARIANT: lambda b: capture(model, b, blocks, **moments_kw),
        "+ 2nd moments, every pos.": lambda b: capture(model, b, blocks, second_moments=True, **kw),
        "plain + isfinite check": lambda b: isfinite_checked(model, b, blocks),
    } | (ablations(model, blocks, moments_kw) if ABLATIONS else {})


def ablations(model, blocks, moments_kw):
    """The second-moments variant without the covariances' Grams (rows still drawn, centred and folded) and
    without the project-input covariance at all (per-channel moments and the pooled SE covariance kept)."""
    return {
        "... without the covariance Grams": lambda b: replaced_capture(
            model, b, blocks, M, "_stage_gram_", lambda staged, *args, **kw: staged, **moments_kw
        ),
        "... without the project covariance": lambda b: replaced_capture(
            model, b, blocks, M.CaptureMoments, "project", _no_project_covariance, **moments_kw
        ),
    }


def minor_faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def time_variants(fns, batches, device="cpu"):
    """{variant: [(wall s, process CPU s, minor page faults) per round]}, rounds interleaved, after a warm-up;
    ``device``'s queued work is waited for before each clock reading."""
    times, sync = {name: [] for name in fns}, synchronizer(device)
    for fn in fns.values():
        fn(batches)
    for _ in range(ROUNDS):
        for name, fn in fns.items():
            sync()
            wall, cpu, faults = time.perf_counter(), time.process_time(), minor_faults()
            fn(batches)
            sync()
            times[name].append((time.perf_counter() - wall, time.process_time() - cpu, minor_faults() - faults))
    return times


def quartiles(values):
    """(first quartile, median, third quartile) of a list."""
    v = sorted(values)
    return tuple(v[round(q * (len(v) - 1))] for q in (0.25, 0.5, 0.75))


def timed_on(device, threads=None):
    """Where a measurement ran, for its table: "N threads" on the CPU (default: torch's count now), else the
    device."""
    if torch.device(device).type == "cpu":
        return f"{threads or torch.get_num_threads()} threads"
    return str(device)


def report_size(size, gen, device="cpu"):
    """Print and return {variant: (median wall s, median CPU s) per pass} at one image size, on ``device``."""
    batches = make_batches(size, N_BATCHES, gen)
    model = calibrated_model(batches).to(device)
    batches = [(images.to(device), labels) for images, labels in batches]
    rounds = time_variants(variants(model, find_blocks(model)), batches, device)
    print(f"\n{ARCH} at {size} px, {N_BATCHES} x {BATCH} images, {timed_on(device)}, {ROUNDS} rounds")
    header = (
        f"{'wall ms/batch':>13s} {'capture / plain, median [quartiles]':>36s} {'CPU ratio':>9s} {'faults/batch':>12s}"
    )
    print(f"  {'':34s} {header}")
    plain_rounds = rounds["plain"]
    for name, times in rounds.items():
        wall = quartiles([w / p for (w, _, _), (p, _, _) in zip(times, plain_rounds)])
        cpu = quartiles([c / p for (_, c, _), (_, p, _) in zip(times, plain_rounds)])
        ms = 1e3 * quartiles([w for w, _, _ in times])[1] / N_BATCHES
        faults = quartiles([f for _, _, f in times])[1] / N_BATCHES
        print(f"  {name:34s} {ms:13.1f} {wall[1]:18.2f}x [{wall[0]:.2f}, {wall[2]:.2f}] {cpu[1]:8.2f}x {faults:12.0f}")
    return {name: tuple(quartiles(list(col))[1] for col in list(zip(*t))[:2]) for name, t in rounds.items()}


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def report_memory(gen):
    """Peak RSS after a short and after a long capture of freshly generated batches (not preloaded)."""
    size = SIZES[0]
    model = calibrated_model(make_batches(size, 1, gen))
    blocks = find_blocks(model)
    print(f"\npeak RSS, capture at {size} px, batches of {BATCH} generated on the fly:")
    for n in MEMORY_BATCHES:
        capture(
            model,
            (make_batches(size, 1, gen)[0] for _ in range(n)),
            blocks,
            CAPTURE_POINT,
            num_classes=NUM_CLASSES,
            progress=False,
        )
        print(f"  after {n:4d} batches ({n * BATCH:5d} images): {peak_rss_mb():8.1f} MB")


def main(cfg):
    torch.manual_seed(SEED)
    if THREADS:
        torch.set_num_threads(THREADS)
    gen = torch.Generator().manual_seed(SEED)
    device = models.pick_device(DEVICE)
    for size in SIZES:
        report_size(size, gen, device)
    report_memory(gen)


if __name__ == "__main__":
    config.run(main, globals())
