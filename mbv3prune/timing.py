"""Wall-clock timing of forward passes: warm-up, then the median of repeats, synchronised on CUDA and MPS.

A *call* is a function of no arguments that runs one forward pass (eager PyTorch or an onnxruntime session,
see ``onnx_export.session_call``). ``interleaved_ms`` times several calls round-robin in one process, so a
change of CPU frequency or a neighbour's load during the measurement falls on all of them alike.
"""

import statistics
import time

import torch

from .errors import PruneError


def synchronizer(device):
    """A function that waits for ``device``'s queued work (CUDA and MPS run asynchronously; a no-op on the CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    if device.type == "mps":
        return lambda: torch.mps.synchronize()
    return lambda: None


def _check_counts(repeats, warmup):
    if repeats < 1 or warmup < 0:
        raise PruneError(f"timing needs repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")


def interleaved_ms(calls, repeats=50, warmup=5, sync=lambda: None):
    """{name: median milliseconds of one call} over ``repeats`` rounds, each round running every call once."""
    _check_counts(repeats, warmup)
    for _ in range(warmup):
        for call in calls.values():
            call()
    sync()
    times = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            t = time.perf_counter()
            call()
            sync()
            times[name].append((time.perf_counter() - t) * 1000)
    return {name: round(statistics.median(ts), 4) for name, ts in times.items()}


def median_ms(call, repeats=50, warmup=5, sync=lambda: None):
    """The median milliseconds of ``call()`` over ``repeats`` runs after ``warmup`` runs."""
    return interleaved_ms({"call": call}, repeats, warmup, sync)["call"]


def eager_call(module, x):
    """A call running ``module(x)`` in eval and inference mode (``x`` already on the module's device)."""
    module.eval()

    def call():
        with torch.inference_mode():
            return module(x)

    return call
