"""Peak memory of a capture does not grow with the number of images: peak RSS at 200 vs 2,000 images.

Generates a synthetic-species set with 2,080 training images (8 classes x 260, 72 px) into
runs/bench_data/, then, each in a fresh subprocess, captures MobileNetV3-Large (random weights) at 64 px over
a stratified sample of 200 and of 2,000 of them through the real loader (PNG decoding, transforms,
histograms per class) and reports the child's peak RSS. Target: RSS(2,000) <= 1.10 x RSS(200).

    python -m benchmarks.capture_memory

Measured (torch 2.14.1, 2-core CPU, NUM_WORKERS=0): see the README's performance table.
"""

import json
import os
import resource
import subprocess
import sys
import time

from mbv3prune import config

# -----------------------------------------------------------------------------
COUNTS = [200, 2000]  # sample sizes compared, each in a fresh process
IMAGE_SIZE = 64  # capture resolution
BATCH_SIZE = 64  # images per batch
DATA_DIR = "runs/bench_data"  # where the 2,080-image set is generated
CHILD = 0  # internal: the sample size a child process captures (0 = this is the parent)
# -----------------------------------------------------------------------------


def child(cfg):
    """Capture ``CHILD`` images and print the peak RSS (MB) and the time as JSON."""
    from mbv3prune.blocks import find_blocks
    from mbv3prune.capture import capture
    from mbv3prune.data import Skipped, batches, discover, eval_transform, make_loader, stratified_sample
    from mbv3prune.models import build_model

    splits, names = discover(cfg["DATA_DIR"])
    items = stratified_sample(splits["train"], per_class=cfg["CHILD"] // len(names), seed=0)
    model = build_model("mobilenet_v3_large", len(names)).eval()
    loader = make_loader(items, eval_transform(cfg["IMAGE_SIZE"]), cfg["BATCH_SIZE"])
    t = time.perf_counter()
    stats, _ = capture(model, batches(loader, Skipped()), find_blocks(model), num_classes=len(names), progress=False)
    print(
        json.dumps(
            {
                "images": len(items),
                "seconds": round(time.perf_counter() - t, 2),
                "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            }
        )
    )


def main(cfg):
    if cfg["CHILD"]:
        return child(cfg)
    from mbv3prune.synthetic import ensure

    ensure(cfg["DATA_DIR"], train_per_class=260, val_per_class=10)
    results = []
    for n in cfg["COUNTS"]:
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "benchmarks.capture_memory",
                f"--CHILD={n}",
                f"--DATA_DIR={cfg['DATA_DIR']}",
                f"--IMAGE_SIZE={cfg['IMAGE_SIZE']}",
            ],
            capture_output=True,
            text=True,
            check=True,
            cwd=os.getcwd(),
        )
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(
            f"{results[-1]['images']:5d} images: peak RSS {results[-1]['peak_rss_mb']:7.1f} MB "
            f"({results[-1]['seconds']:.1f} s capture)"
        )
    ratio = results[-1]["peak_rss_mb"] / results[0]["peak_rss_mb"]
    print(f"peak RSS ratio {results[-1]['images']} / {results[0]['images']} images: {ratio:.3f} (target <= 1.10)")
    return results


if __name__ == "__main__":
    config.run(main, globals())
