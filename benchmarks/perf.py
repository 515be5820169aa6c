"""Speed and memory: capture overhead, peak RSS, the demo pipeline stage by stage, pruned vs baseline latency.

Reads:  runs/demo/ (after `make demo`: its baseline is re-used, every later stage runs again) and, for the
        latency on real photos, runs/flowers/ (after `make flowers`) when it is there.
Writes: OUT (runs/bench/perf.json: every figure, the machine, the versions) and prints one table per part.
1. Capture overhead: capture time / plain inference time on the same preloaded images (benchmarks.
   capture_overhead, at OVERHEAD_THREADS: torch's default, the targets' setting), and peak RSS of a capture of
   200 vs 2,000 images (benchmarks.capture_memory).
2. The demo pipeline, stage by stage: wall time of each stage script as `make demo` runs it (a fresh
   process each, the capture forced with RECAPTURE=True); the training time is the one recorded when the
   baseline was trained (timings.json), not trained again.
3. Latency of baseline.pt and pruned.pt at batch 1 and 32 (median of LATENCY_REPEATS, after warm-up; CUDA
   synchronised on a GPU) against their MACs: how much of the MACs saving becomes real time.
4. Runtimes: baseline.pt against a pruned checkpoint (a target_macs plan's, say) in eager PyTorch and in
   onnxruntime (both exported with torch's dynamo exporter and checked against eager), at batch 1 and 32,
   baseline and pruned timed as interleaved rounds in one process, one runtime at a time, at RUNTIME_THREADS
   intra-op threads in both (median of RUNTIME_REPEATS): the fraction of latency saved, and its ratio to the
   fraction of MACs saved.
On a GPU (DEVICE=auto finds it) parts 1, 3 and 4 run there (part 1's peak RSS and part 4 on the CPU when
onnxruntime has no CUDA provider); part 2 measures what the stages do on this machine.

    python -m benchmarks.perf
    python -m benchmarks.perf --PARTS='["latency"]'
    python -m benchmarks.perf --PARTS='["runtimes"]' --RUNTIME_RUNS='[["runs/flowers", 128, "pruned.pt"]]'
"""

import os
import platform
import subprocess
import sys
import tempfile
import time

import torch

from mbv3prune import config, models, onnx_export, stage
from mbv3prune.artifacts import read_json, versions, write_json
from mbv3prune.errors import PruneError
from mbv3prune.evaluate import latency_ms
from mbv3prune.prune import count_macs_params

# -----------------------------------------------------------------------------
PARTS = ["capture", "pipeline", "latency", "runtimes"]  # which parts to measure
DEMO_DIR = "runs/demo"  # the demo run (`make demo`)
LATENCY_RUNS = [["runs/demo", 64], ["runs/flowers", 128]]  # [run dir, image size] pairs timed (missing: skipped)
LATENCY_REPEATS = 30  # timed forward passes per model and batch size (the median is reported)
RUNTIME_RUNS = [["runs/demo", 64, "pruned.pt"], ["runs/flowers", 128, "pruned.pt"]]  # [run dir, px, pruned file]
RUNTIME_BATCHES = [1, 32]  # batch sizes of the runtimes part
RUNTIME_REPEATS = 200  # interleaved rounds of the runtimes part (the median is reported)
RUNTIME_WARMUP = 20  # untimed rounds first
RUNTIME_THREADS = 0  # intra-op threads of eager and onnxruntime in the runtimes part (0: torch's default)
OVERHEAD_SIZES = [64, 128]  # image sizes of the capture-overhead measurement
OVERHEAD_THREADS = 0  # torch threads of the capture-overhead measurement (0: torch's default; 1: CPU time meaningful)
OUT = "runs/bench/perf.json"  # where the figures are written
DEVICE = "auto"  # auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps
DEBUG = False  # show tracebacks of the project's errors
# -----------------------------------------------------------------------------
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_STAGES = [  # what `make demo` runs after training (keep in step with the Makefile)
    ("mobilenetv3_features.py", []),
    ("get_model_architecture.py", []),
    ("visualize_neuron_activations.py", ["--RECAPTURE=True"]),
    ("visualize_channel_activation.py", []),
    ("experiment_activation_based_block_pruning.py", []),
    ("validate_model_structure.py", []),
    ("get_model_architecture.py", ["--COMPARE={run}/pruned.pt", "--OUT={run}/architecture_pruned.json"]),
    ("visualize_activation_overlay_image.py", []),
]


def thread_count(cfg, key):
    """``cfg[key]`` threads, or torch's current count for 0; a negative count is refused in one line."""
    if cfg[key] < 0:
        raise PruneError(f"{key}={cfg[key]} must be 0 (torch's default) or a number of threads")
    return cfg[key] or torch.get_num_threads()


def capture_part(cfg, device):
    """Capture / plain inference time ratios (on ``device``, at OVERHEAD_THREADS) and peak RSS at 200 vs 2,000
    images."""
    from benchmarks import capture_memory, capture_overhead

    threads = torch.get_num_threads()
    torch.set_num_threads(thread_count(cfg, "OVERHEAD_THREADS"))
    measured_threads = torch.get_num_threads()
    gen = torch.Generator().manual_seed(0)
    out = {}
    try:
        for size in cfg["OVERHEAD_SIZES"]:
            times = capture_overhead.report_size(size, gen, device)
            wall0, cpu0 = times["plain"]
            out[f"{size}px"] = {
                name: {"wall_ratio": round(w / wall0, 3), "cpu_ratio": round(c / cpu0, 3)}
                for name, (w, c) in times.items()
            }
    finally:
        torch.set_num_threads(threads)
    memory = capture_memory.main(
        {"COUNTS": [200, 2000], "IMAGE_SIZE": 64, "BATCH_SIZE": 64, "DATA_DIR": "runs/bench_data", "CHILD": 0}
    )
    return {
        "overhead": out,
        "overhead_device": str(device),
        "overhead_threads": measured_threads,
        "peak_rss": memory,
        "rss_ratio": round(memory[-1]["peak_rss_mb"] / memory[0]["peak_rss_mb"], 3),
    }


def pipeline_part(cfg):
    """Wall seconds of each demo stage, run as `make demo` runs it."""
    run = cfg["DEMO_DIR"]
    if not os.path.exists(os.path.join(run, "baseline.pt")):
        raise PruneError(f"{run}/baseline.pt not found: run `make demo` first")
    trained = read_json(os.path.join(run, "timings.json"), "timings").get("train_model", {}).get("seconds")
    rows = [{"stage": "train_model.py (recorded when trained)", "seconds": trained}]
    for script, args in DEMO_STAGES:
        t = time.perf_counter()
        done = subprocess.run(
            [sys.executable, os.path.join(ROOT, script), f"--RUN_DIR={run}", *(a.format(run=run) for a in args)],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        if done.returncode:
            raise PruneError(f"{script} failed: {done.stderr.strip().splitlines()[-1] if done.stderr else ''}")
        rows.append(
            {
                "stage": " ".join([script, *(a.split("=")[0] for a in args)]),
                "seconds": round(time.perf_counter() - t, 1),
            }
        )
        print(f"  {rows[-1]['stage']}: {rows[-1]['seconds']} s")
    return rows


def latency_part(cfg, device):
    """Per run: MACs and latency at batch 1 and 32 of baseline.pt and pruned.pt."""
    out = []
    for run, size in cfg["LATENCY_RUNS"]:
        paths = [os.path.join(run, f) for f in ("baseline.pt", "pruned.pt")]
        if not all(os.path.exists(p) for p in paths):
            print(f"  {run}: no baseline.pt and pruned.pt, skipped")
            continue
        row = {"run": run, "image_size": size}
        for label, path in zip(("baseline", "pruned"), paths):
            model, _ = models.load_checkpoint(path)
            model.eval()
            row[f"{label}_macs"], _ = count_macs_params(model, size)
            model.to(device)
            for batch in (1, 32):
                row[f"{label}_ms_b{batch}"] = latency_ms(model, size, batch, device, repeats=cfg["LATENCY_REPEATS"])
        row["macs_ratio"] = round(row["pruned_macs"] / row["baseline_macs"], 3)
        for batch in (1, 32):
            row[f"time_ratio_b{batch}"] = round(row[f"pruned_ms_b{batch}"] / row[f"baseline_ms_b{batch}"], 3)
        out.append(row)
    return out


def runtimes_part(cfg, device):
    """Per run: baseline vs pruned in eager and onnxruntime, interleaved at fixed threads; latency vs MACs saved."""
    if not onnx_export.runs_on(device):
        print(f"  onnxruntime here has no provider for {device}: both runtimes timed on the CPU")
        device = torch.device("cpu")
    threads = torch.get_num_threads()
    torch.set_num_threads(thread_count(cfg, "RUNTIME_THREADS"))
    try:
        rows = []
        for run, size, pruned in cfg["RUNTIME_RUNS"]:
            paths = {"baseline": os.path.join(run, "baseline.pt"), "pruned": os.path.join(run, pruned)}
            if not all(os.path.exists(p) for p in paths.values()):
                print(f"  {run}: no baseline.pt and {pruned}, skipped")
                continue
            rows.append(runtime_row(paths, size, cfg, device))
        return rows
    finally:
        torch.set_num_threads(threads)


def runtime_row(paths, size, cfg, device):
    """One run's record: MACs, ONNX agreement, {label: {runtime: {batch: ms}}}, saved fractions and their ratio."""
    shape, loaded = (3, size, size), {label: models.load_checkpoint(p) for label, p in paths.items()}
    macs = {label: count_macs_params(model, size)[0] for label, (model, _) in loaded.items()}
    with tempfile.TemporaryDirectory(prefix="perf_onnx_") as tmp:
        entries = {
            label: (model, onnx_export.export_onnx(model, os.path.join(tmp, f"{label}.onnx"), shape))
            for label, (model, _) in loaded.items()
        }
        diffs = {label: onnx_export.max_difference(model, path, shape) for label, (model, path) in entries.items()}
        ms = onnx_export.interleaved_latency(
            entries, shape, device, cfg["RUNTIME_BATCHES"], cfg["RUNTIME_REPEATS"], cfg["RUNTIME_WARMUP"]
        )
    macs_saved = 1 - macs["pruned"] / macs["baseline"]
    saved = {
        rt: {b: round(1 - ms["pruned"][rt][b] / ms["baseline"][rt][b], 4) for b in cfg["RUNTIME_BATCHES"]}
        for rt in ("eager", "onnxruntime")
    }
    return {
        "pruned": paths["pruned"],
        "image_size": size,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "repeats": cfg["RUNTIME_REPEATS"],
        "prune_mode": loaded["pruned"][1].get("config", {}).get("PRUNE_MODE"),
        "macs": macs,
        "macs_saved": round(macs_saved, 4),
        "max_abs_diff": diffs,
        "ms": ms,
        "latency_saved": saved,
        "latency_per_macs_saved": {
            rt: {b: round(v / macs_saved, 3) if macs_saved > 0 else None for b, v in by_batch.items()}
            for rt, by_batch in saved.items()
        },
    }


def machine(device):
    return {
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        **versions(),
    }


def main(cfg):
    device = models.pick_device(cfg["DEVICE"])
    result = {"schema_version": 1, "kind": "mbv3prune-perf", "machine": machine(device), "config": cfg}
    if "capture" in cfg["PARTS"]:
        print("capture overhead and memory:")
        result["capture"] = capture_part(cfg, device)
    if "pipeline" in cfg["PARTS"]:
        print(f"demo pipeline ({cfg['DEMO_DIR']}), stage by stage:")
        result["pipeline"] = pipeline_part(cfg)
    if "latency" in cfg["PARTS"]:
        print(f"latency on {device}:")
        result["latency"] = latency_part(cfg, device)
    if "runtimes" in cfg["PARTS"]:
        print("eager vs onnxruntime, baseline vs pruned:")
        result["runtimes"] = runtimes_part(cfg, device)
    write_json(cfg["OUT"], result)
    summary(result)
    stage.finish([cfg["OUT"]])


def summary(result):
    if "capture" in result:
        from benchmarks import capture_overhead

        names = ["capture, no histograms", capture_overhead.DEFAULT_VARIANT, capture_overhead.MOMENTS_VARIANT]
        rows = [[size, *(v[n]["wall_ratio"] for n in names)] for size, v in result["capture"]["overhead"].items()]
        where = capture_overhead.timed_on(result["capture"]["overhead_device"], result["capture"]["overhead_threads"])
        head = [f"size ({where})", "capture/plain, no histograms"]
        print("\n" + stage.table(rows, [*head, "histograms", "+ second moments"]))
        rss = result["capture"]["peak_rss"]
        print(
            f"peak RSS {rss[0]['images']} images {rss[0]['peak_rss_mb']} MB, {rss[-1]['images']} images "
            f"{rss[-1]['peak_rss_mb']} MB (ratio {result['capture']['rss_ratio']})"
        )
    if "pipeline" in result:
        print("\n" + stage.table([[r["stage"], r["seconds"]] for r in result["pipeline"]], ["stage", "seconds"]))
    if result.get("latency"):
        rows = [
            [
                r["run"],
                r["image_size"],
                r["macs_ratio"],
                r["baseline_ms_b1"],
                r["pruned_ms_b1"],
                r["time_ratio_b1"],
                r["baseline_ms_b32"],
                r["pruned_ms_b32"],
                r["time_ratio_b32"],
            ]
            for r in result["latency"]
        ]
        print(
            "\n"
            + stage.table(rows, ["run", "px", "MACs ratio", "b1 ms", "pruned", "ratio", "b32 ms", "pruned", "ratio"])
        )
    if result.get("runtimes"):
        print("\n" + runtimes_table(result["runtimes"]))


def runtimes_table(rows):
    """One line per pruned model and runtime: ms per batch, latency saved, and latency saved / MACs saved."""
    lines, headers = [], ["pruned", "mode", "px", "MACs saved", "runtime"]
    batches = list(rows[0]["latency_saved"]["eager"])
    for b in batches:
        headers += [f"b{b} ms", "pruned", "saved", "saved/MACs"]
    for r in rows:
        for rt in ("eager", "onnxruntime"):
            cells = [r["pruned"], r["prune_mode"], r["image_size"], r["macs_saved"], rt]
            for b in batches:
                cells += [
                    r["ms"]["baseline"][rt][b],
                    r["ms"]["pruned"][rt][b],
                    r["latency_saved"][rt][b],
                    r["latency_per_macs_saved"][rt][b],
                ]
            lines.append(cells)
    return stage.table(lines, headers)


if __name__ == "__main__":
    config.run(main, globals())
