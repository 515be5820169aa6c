"""torch.compile for the capture's per-batch reductions, with the eager function wherever compiling fails.

Eagerly, reducing one captured [B, C, H, W] tensor to its per-channel totals (count below the threshold,
sum, sum of |a|, of a**2, max |a|, histogram bin keys) makes about ten passes over it, each with a temporary
as large as the tensor; at small images that costs as much as the inference itself. Compiled by inductor
the same function is a loop or two that read the tensor once (``benchmarks/capture_overhead.py``).

``compiled(fn)`` is ``fn`` compiled with ``dynamic=True``: one kernel for every layer's shape, a few per
process for the combinations of arguments a capture uses (dynamo compiles at most 8 per function and runs
eagerly past that). It runs ``fn`` itself on devices other than CPU and CUDA, under
``TORCH_COMPILE_DISABLE=1`` (torch's own switch), and on a device type where compiling has failed once (no
C++ compiler for the CPU, no triton for the GPU, ...), which it says in one line; running out of memory is
raised, not taken for a compiler failure. The first call on a machine compiles (about 20 s on a 2-core
CPU; inductor keeps the kernels on disk, so a later process loads them in about 2 s). Results equal the
eager function's up to float rounding (reductions may add in another order).
"""

import warnings

import torch


class _Compiled:
    def __init__(self, fn):
        self.fn, self.failed = fn, set()  # failed: the device types where compiling failed
        self.compiled = torch.compile(fn, dynamic=True)

    def __call__(self, x, *args):
        if x.device.type in self.failed or x.device.type not in ("cpu", "cuda"):
            return self.fn(x, *args)
        try:
            return self.compiled(x, *args)
        except torch.OutOfMemoryError:
            raise
        except Exception as error:  # any compiler failure: the eager function gives the same results
            self.failed.add(x.device.type)
            reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
            warnings.warn(
                f"torch.compile failed for {self.fn.__name__} ({type(error).__name__}: {reason}): "
                "it runs eagerly from now on (same results, slower capture)",
                stacklevel=2,
            )
            return self.fn(x, *args)


def compiled(fn):
    """``fn(x, *args)`` compiled, falling back to ``fn`` itself (see the module docstring)."""
    return _Compiled(fn)
