"""Helpers the tests share: tiny image folders and models, and running a stage script (fixtures: conftest.py)."""

import os
import subprocess
import sys

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLOWERS = os.path.join(ROOT, "..", "shared", "data", "oxford-flowers12")


def write_images(folder, n, seed, size=40, mode="RGB"):
    """``n`` random images of ``mode`` in ``folder`` (PNG, or JPEG for CMYK)."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        arr = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
        im = Image.fromarray(arr).convert(mode)
        ext = "jpg" if mode == "CMYK" else "png"
        im.save(os.path.join(folder, f"{i:03d}.{ext}"))


def count_host_reads(monkeypatch):
    """A list that gets a name for every int(), bool(), float(), index use, .item() or .tolist() of a tensor:
    the reads made from Python, each of which waits for a GPU. Waits inside torch's own calls (a blocking
    copy to the device, bincount's maximum, boolean-mask indexing) are not seen here; on CUDA,
    ``torch.cuda.set_sync_debug_mode`` sees those."""
    import torch

    reads = []
    for name in ("__int__", "__bool__", "__float__", "__index__", "item", "tolist"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(
            torch.Tensor, name, lambda t, *a, original=original, name=name: reads.append(name) or original(t, *a)
        )
    return reads


def run_script(script, *args, cwd=ROOT):
    """Run a stage script in a subprocess; returns the CompletedProcess (never raises on failure)."""
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, script), *args], cwd=cwd, capture_output=True, text=True, timeout=900
    )


def run_stage(script, *args):
    """Run a stage script in this process (fresh module namespace): (exit status, stdout, stderr)."""
    import contextlib
    import io
    import runpy

    from mbv3prune import config

    namespace = runpy.run_path(os.path.join(ROOT, script), run_name="stage_under_test")
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            config.run(namespace["main"], namespace, list(args))
        except SystemExit as exc:
            code = exc.code
    return code, out.getvalue(), err.getvalue()


def randomized_model(arch, seed=0, size=32):
    """A 3-class model in eval mode: random biases and BN affine terms, BN statistics measured on random images
    (so channels differ everywhere and the input still reaches the output)."""
    import torch

    from mbv3prune import models

    torch.manual_seed(seed)
    model = models.build_model(arch, 3)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1 + (1.0 if name.endswith("weight") else 0.0))
        bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None  # cumulative average: the statistics of the calibration batch
        model.train()(torch.randn(8, 3, size, size, generator=gen))
        for bn in bns:
            bn.momentum = 0.1
    return model.eval()
