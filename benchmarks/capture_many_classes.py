"""Peak memory and time of a capture over thousands of species: 20,000 generated images at 64 px, labels
over 10,000 classes, MobileNetV3-Large (random weights), PER_CLASS=auto with MAX_STATS_MEMORY_GB=4.

Per-class histograms of 10,000 classes would take about 47 GB on Large, so "auto" keeps per-class counts and
mean |a| (one line says so) and the overall histograms. The images are seeded random tensors made batch by
batch (nothing is kept), so the figure is the capture's own memory. Target: peak RSS < 4 GB.

    python -m benchmarks.capture_many_classes

Measured (torch 2.14.1, a 2-core CPU shared with a test run, one thread, PER_CLASS=auto -> counts): 20,000
images in 298 s (67 images/s), statistics 0.38 GB, peak RSS 1.23 GB (target < 4 GB).
"""

import resource
import time

import torch

from mbv3prune import config, measure
from mbv3prune.blocks import find_blocks
from mbv3prune.capture import capture
from mbv3prune.models import build_model

# -----------------------------------------------------------------------------
IMAGES = 20_000  # images streamed through the capture
CLASSES = 10_000  # classes the labels are drawn from
IMAGE_SIZE = 64  # capture resolution
BATCH_SIZE = 64  # images per batch
PER_CLASS = "auto"  # what the capture keeps per class (see mbv3prune/capture.py)
MAX_STATS_MEMORY_GB = 4.0  # PER_CLASS=auto keeps per-class histograms only while they take at most this
SEED = 0  # seeds the images and labels
# -----------------------------------------------------------------------------


def generated_batches(cfg):
    """Seeded (images, labels) batches, made one at a time; every class gets images in turn."""
    gen = torch.Generator().manual_seed(cfg["SEED"])
    for start in range(0, cfg["IMAGES"], cfg["BATCH_SIZE"]):
        n = min(cfg["BATCH_SIZE"], cfg["IMAGES"] - start)
        labels = torch.arange(start, start + n) % cfg["CLASSES"]
        yield torch.randn(n, 3, cfg["IMAGE_SIZE"], cfg["IMAGE_SIZE"], generator=gen), labels


def main(cfg):
    torch.manual_seed(cfg["SEED"])
    model = build_model("mobilenet_v3_large", cfg["CLASSES"]).eval()
    blocks = find_blocks(model)
    mode = measure.per_class_mode({**cfg, "CAPTURE_POINT": "project_input"}, blocks, cfg["CLASSES"])
    t0 = time.perf_counter()
    stats, _ = capture(
        model, generated_batches(cfg), blocks, num_classes=cfg["CLASSES"], progress=False, per_class=mode
    )
    seconds = time.perf_counter() - t0
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    stats_gb = sum(t.numel() * t.element_size() for t in stats.values()) / 2**30
    print(
        f"{cfg['IMAGES']} images, {cfg['CLASSES']} classes, PER_CLASS={mode}: {seconds:.0f} s "
        f"({cfg['IMAGES'] / seconds:.0f} images/s), statistics {stats_gb:.2f} GB, peak RSS {peak_gb:.2f} GB "
        f"(target < 4 GB)"
    )


if __name__ == "__main__":
    config.run(main, globals())
