"""Capture throughput under torchrun with 1 and 2 processes (images per second), on the same sample.

Each run is the real stage, ``torchrun --standalone --nproc_per_node=P visualize_neuron_activations.py
--RECAPTURE=True``, on the 2,080-image synthetic-species set of ``benchmarks.capture_memory`` (runs/bench_data,
generated on first use) with MobileNetV3 (random weights, BN statistics measured on random images so the
activations have realistic magnitudes). The throughput is the stage's own record in RUN_DIR/timings.json:
``capture.images / capture.seconds`` (sampling, loading and decoding the PNGs, the forward passes, the
histograms and the all_reduce of the totals; not the process start or the figures). Rounds are interleaved
and each process count's fastest round is reported.

On a CPU the fair comparison shares the same cores: THREADS in all, i.e. 1 process x THREADS threads against
P processes x THREADS / P threads (OMP_NUM_THREADS is set for each process). On GPUs every process gets its
own GPU and THREADS / P CPU threads.

    python -m benchmarks.scaling                                   # CPU: 1 x 2 threads vs 2 x 1 thread
    python -m benchmarks.scaling --PROCESSES=[1,2,4,8] --THREADS=16  # a machine with 8 GPUs

Prints a table and writes runs/bench/scaling.json. Measured: see the README's multi-GPU section.
"""

import os
import platform
import subprocess
import sys

import torch

from mbv3prune import config, models
from mbv3prune.artifacts import read_json, versions, write_json
from mbv3prune.errors import PruneError
from mbv3prune.stage import table

STAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "visualize_neuron_activations.py")

# -----------------------------------------------------------------------------
PROCESSES = [1, 2]  # process counts compared (on GPUs: one GPU each)
THREADS = 2  # CPU threads shared by the processes of a run (0 = every core of this machine)
ROUNDS = 2  # interleaved rounds; each process count's fastest is reported
ARCH = "mobilenet_v3_large"  # torchvision model captured
SAMPLES_PER_CLASS = 128  # images per class of the sample (8 classes)
IMAGE_SIZE = 64  # capture resolution
BATCH_SIZE = 32  # images per batch and process
NUM_WORKERS = 0  # data-loading workers per process (0: decoding shares the process's threads)
DEVICE = "auto"  # auto (CUDA when present), cpu or cuda
DATA_DIR = "runs/bench_data"  # the capture_memory benchmark's data set (generated on first use)
RUN_DIR = "runs/bench/scaling"  # checkpoint and one run directory per process count
OUT = "runs/bench/scaling.json"  # the results
SEED = 0  # seeds the weights and the sample
# -----------------------------------------------------------------------------


def make_checkpoint(cfg, class_names):
    """A random-weight model whose BN statistics come from random images, saved as RUN_DIR/baseline.pt."""
    torch.manual_seed(cfg["SEED"])
    model = models.build_model(cfg["ARCH"], len(class_names))
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # cumulative average
    with torch.no_grad():
        model.train()(torch.randn(32, 3, cfg["IMAGE_SIZE"], cfg["IMAGE_SIZE"]))
    path = os.path.join(cfg["RUN_DIR"], "baseline.pt")
    models.save_checkpoint(path, model.eval(), cfg["ARCH"], class_names)
    return path


def run(cfg, processes, checkpoint, threads):
    """One torchrun capture; returns the stage's "capture" timings."""
    run_dir = os.path.join(cfg["RUN_DIR"], f"p{processes}")
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, threads // processes))}
    args = [
        f"--{k}={cfg[k]}"
        for k in ("DATA_DIR", "IMAGE_SIZE", "BATCH_SIZE", "NUM_WORKERS", "DEVICE", "SAMPLES_PER_CLASS", "SEED")
    ]
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={processes}",
            STAGE,
            f"--RUN_DIR={run_dir}",
            f"--MODEL_ARCH={cfg['ARCH']}",
            f"--CHECKPOINT={checkpoint}",
            "--RECAPTURE=True",
            "--SAVE_EVERY=0",
            *args,
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    if done.returncode:
        raise PruneError(f"torchrun with {processes} processes failed: {done.stderr.strip()[-1500:]}")
    return read_json(os.path.join(run_dir, "timings.json"))["capture"]


def main(cfg):
    from mbv3prune.synthetic import ensure

    manifest = ensure(cfg["DATA_DIR"], train_per_class=260, val_per_class=10)
    checkpoint = make_checkpoint(cfg, manifest["classes"])
    threads = cfg["THREADS"] or os.cpu_count()
    device = models.pick_device(cfg["DEVICE"])
    best = {}
    for _ in range(cfg["ROUNDS"]):
        for p in cfg["PROCESSES"]:
            t = run(cfg, p, checkpoint, threads)
            print(f"{p} process(es): {t['images']} images in {t['seconds']:.2f} s")
            if p not in best or t["seconds"] < best[p]["seconds"]:
                best[p] = t
    base = best[cfg["PROCESSES"][0]]["images"] / best[cfg["PROCESSES"][0]]["seconds"]
    rows = [
        {
            "processes": p,
            "threads_per_process": max(1, threads // p),
            "images": t["images"],
            "seconds": t["seconds"],
            "images_per_s": round(t["images"] / t["seconds"], 1),
            "speedup": round(t["images"] / t["seconds"] / base, 2),
        }
        for p, t in best.items()
    ]
    print(f"\ncapture of {cfg['ARCH']} at {cfg['IMAGE_SIZE']} px, batch {cfg['BATCH_SIZE']} per process, {device}:")
    print(table([list(r.values()) for r in rows], list(rows[0])))
    write_json(
        cfg["OUT"],
        {
            "rows": rows,
            "device": str(device),
            "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
            "config": cfg,
            "versions": versions(),
        },
    )
    print(f"wrote {cfg['OUT']}")


if __name__ == "__main__":
    config.run(main, globals())
