"""ONNX: export a model (baseline or pruned) or one block, check onnxruntime against eager, time both.

The exporter is the one torch 2.14 recommends, ``torch.onnx.export(..., dynamo=True)`` (it needs onnxscript),
with a dynamic batch axis, traced on a seeded batch of 2 (a batch of 1 would let torch.export specialise
the axis). The file is written atomically and in one piece (no external data). Sessions run with as many
intra-op threads as torch uses (``torch.get_num_threads()``) and one inter-op thread, so eager and
onnxruntime timings compare like for like. On CUDA a session needs onnxruntime's CUDA provider (the
``onnxruntime-gpu`` package) and is fed by I/O binding, so no host copy is timed.
"""

import contextlib
import copy
import io
import warnings

import numpy as np
import torch

from .artifacts import atomic_write
from .errors import PruneError
from .timing import eager_call, interleaved_ms, synchronizer

INPUT, OUTPUT = "input", "output"  # the graph's input and output names


def example_batch(input_shape, batch_size, seed=0, device="cpu"):
    """A seeded (batch_size, *input_shape) float32 tensor on ``device``."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch_size, *input_shape, generator=gen).to(device)


def export_onnx(model, path, input_shape):
    """Export ``model`` (inputs of ``input_shape`` = (C, H, W), any batch) to ``path`` atomically; returns path.

    The model is exported from a CPU copy in eval mode, so the caller's model is left as it was.
    """
    module = copy.deepcopy(model).cpu().eval()
    batch = torch.export.Dim("batch", min=1)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporter's notes on its own internals
            program = torch.onnx.export(
                module,
                (example_batch(input_shape, 2),),
                dynamo=True,
                verbose=False,
                input_names=[INPUT],
                output_names=[OUTPUT],
                dynamic_shapes=({0: batch},),
            )
    except Exception as err:  # the exporter raises many types
        raise PruneError(f"ONNX export to {path} failed: {type(err).__name__}: {str(err).splitlines()[0]}") from None
    return atomic_write(path, lambda tmp: program.save(tmp, external_data=False))


def runs_on(device):
    """Whether this onnxruntime can run sessions on ``device`` (CPU always; CUDA with onnxruntime-gpu)."""
    import onnxruntime as ort

    device = torch.device(device)
    return device.type == "cpu" or (device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers())


def _providers(device):
    import onnxruntime as ort

    if device.type == "cpu":
        return ["CPUExecutionProvider"]
    if runs_on(device):
        return [("CUDAExecutionProvider", {"device_id": device.index or 0})]
    raise PruneError(
        f"onnxruntime here cannot run on {device} (providers: {', '.join(ort.get_available_providers())})"
        ": install onnxruntime-gpu for CUDA, or time in eager (LATENCY_RUNTIME=eager)"
    )


def session(path, device="cpu", threads=None, spin=True):
    """An onnxruntime InferenceSession of ``path`` on ``device`` with ``threads`` intra-op threads (torch's count).

    ``spin``: idle threads spin-wait for the next run (onnxruntime's default, as deployed). Spinning, they
    take the cores from eager runs timed right after (eager batch 1 measured 3-20x slower interleaved with a
    spinning session on a loaded 2-core machine): ``interleaved_latency`` times one runtime at a time.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only
    try:
        return ort.InferenceSession(str(path), options, providers=_providers(torch.device(device)))
    except PruneError:
        raise
    except Exception as err:  # onnxruntime raises its own types for unreadable or invalid files
        raise PruneError(f"onnxruntime cannot load {path}: {str(err).splitlines()[0]}") from None


def session_call(sess, x):
    """A call running ``sess`` on the tensor ``x`` (CUDA tensors through I/O binding, kept on the device)."""
    if x.device.type != "cuda":
        feed = {INPUT: x.detach().cpu().numpy()}
        return lambda: sess.run(None, feed)
    x = x.detach().contiguous()
    binding = sess.io_binding()
    binding.bind_input(INPUT, "cuda", x.device.index or 0, np.float32, list(x.shape), x.data_ptr())
    binding.bind_output(OUTPUT, "cuda", x.device.index or 0)
    return lambda: sess.run_with_iobinding(binding)


def max_difference(model, path, input_shape, batch_sizes=(1, 3), atol=1e-4, rtol=1e-4):
    """The largest |onnxruntime - eager| output difference over ``batch_sizes`` (CPU, seeded inputs).

    Raises PruneError naming ``path`` when any output is off by more than ``atol + rtol * |eager|``.
    """
    module, sess, worst = copy.deepcopy(model).cpu().eval(), session(path), 0.0
    for b in batch_sizes:
        x = example_batch(input_shape, b, seed=b)
        with torch.inference_mode():
            expected = module(x).numpy()
        got = sess.run(None, {INPUT: x.numpy()})[0]
        if got.shape != expected.shape:
            raise PruneError(f"ONNX file {path}: output shape {got.shape} at batch {b}, eager gives {expected.shape}")
        diff = np.abs(got - expected)
        worst = max(worst, float(diff.max()))
        if (diff > atol + rtol * np.abs(expected)).any():
            raise PruneError(
                f"ONNX file {path}: onnxruntime's output differs from eager by up to {diff.max():.3g} "
                f"at batch {b} (tolerance atol={atol}, rtol={rtol})"
            )
    return worst


def interleaved_latency(entries, input_shape, device="cpu", batch_sizes=(1, 32), repeats=50, warmup=5):
    """{label: {"eager": {batch: ms}, "onnxruntime": {batch: ms}}} for ``entries`` {label: (model, ONNX path)}.

    At each batch size and in each runtime in turn, all models run round-robin (``timing.interleaved_ms``) on
    ``device``, so drift and a neighbour's load fall on all of them alike; medians of ``repeats`` rounds. The
    runtimes are not interleaved with each other: each one's idle threads spin-wait and would slow the other.
    """
    device = torch.device(device)
    runners = {
        label: (copy.deepcopy(model).to(device).eval(), session(path, device))
        for label, (model, path) in entries.items()
    }
    out = {label: {"eager": {}, "onnxruntime": {}} for label in entries}
    for b in batch_sizes:
        x = example_batch(input_shape, b, device=device)
        for runtime in ("eager", "onnxruntime"):
            calls = {
                label: eager_call(module, x) if runtime == "eager" else session_call(sess, x)
                for label, (module, sess) in runners.items()
            }
            for label, ms in interleaved_ms(calls, repeats, warmup, synchronizer(device)).items():
                out[label][runtime][b] = ms
    return out


def runtime_latency(model, path, input_shape, device="cpu", batch_sizes=(1, 32), repeats=50, warmup=5):
    """{"eager": {batch: ms}, "onnxruntime": {batch: ms}, "threads": n}: medians of repeats on ``device``."""
    ms = interleaved_latency({"model": (model, path)}, input_shape, device, batch_sizes, repeats, warmup)["model"]
    return {**ms, "threads": torch.get_num_threads()}


def export_checked(
    model, path, image_size, device="cpu", batch_sizes=(1, 32), repeats=50, warmup=5, atol=1e-4, rtol=1e-4
):
    """Export an image model to ``path``, check it against eager, time both runtimes; the record for a report:

    {"path", "max_abs_diff", "latency_ms": {"eager": {batch: ms}, "onnxruntime": {batch: ms}, "threads": n}}.
    """
    shape = (3, image_size, image_size)
    export_onnx(model, path, shape)
    diff = max_difference(model, path, shape, atol=atol, rtol=rtol)
    return {
        "path": str(path),
        "max_abs_diff": diff,
        "latency_ms": runtime_latency(model, path, shape, device, batch_sizes, repeats, warmup),
    }
