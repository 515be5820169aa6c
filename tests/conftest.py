"""Shared fixtures: tiny image folders and tiny models, so the suite runs fast on a 2-core CPU."""
import os
import subprocess
import sys

import numpy as np
import pytest
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


@pytest.fixture
def image_folder(tmp_path):
    """An ImageFolder with train/ and val/, three classes, a few 40-px images each."""
    def make(classes=("ant", "bee", "moth"), n_train=4, n_val=2):
        for c, name in enumerate(classes):
            write_images(tmp_path / "train" / name, n_train, seed=c)
            write_images(tmp_path / "val" / name, n_val, seed=100 + c)
        return str(tmp_path)
    return make


def run_script(script, *args, cwd=ROOT):
    """Run a stage script in a subprocess; returns the CompletedProcess (never raises on failure)."""
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=900)


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


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """Three classes, 6 train and 3 val images each, 40 px: enough for every stage at 32 px."""
    root = tmp_path_factory.mktemp("tiny_data")
    for c, name in enumerate(["ant", "bee", "moth"]):
        write_images(root / "train" / name, 6, seed=c)
        write_images(root / "val" / name, 3, seed=100 + c)
    return str(root)


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
