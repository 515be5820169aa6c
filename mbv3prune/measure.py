"""The capture stage's artifacts: the stratified sample, a resumable capture, activation_stats.pt / .json.

``activation_stats.pt`` holds the running totals (a dict of plain tensors, see ``capture``) and
``activation_stats.json`` what they were measured on: the sample (every file and label), capture point,
threshold, image size, the checkpoint's sha256 and widths, config and versions. A later stage re-uses them
unless they were measured on another checkpoint, sample, capture point or image size.

Under torchrun every process captures a disjoint shard of the sample (``distributed.shard``) and the totals
are added across processes, so the statistics equal a one-process capture of the same sample (counts
exactly, sums to float rounding; ``n_batches`` counts the batches of all processes). Rank 0 alone decides
whether to re-use, reads and writes. Partial saves need one process: ``SAVE_EVERY`` is ignored under
torchrun with several processes, and ``RESUME=True`` is refused there.
"""
import hashlib
import json
import os
import time

import torch

from . import capture as C
from . import distributed, stage
from .artifacts import load_tensors, provenance, read_json, record_timings, save_tensors, sha256_file, write_json
from .data import Skipped, batches, stratified_sample
from .errors import PruneError

STATS_PT, STATS_JSON, PARTIAL = "activation_stats.pt", "activation_stats.json", "activation_stats.partial.pt"


def sample(cfg, splits):
    """The stratified sample of the training split that every capture of this config measures."""
    per_class = cfg["SAMPLES_PER_CLASS"] if not cfg["SAMPLE_FRACTION"] else None
    return stratified_sample(splits["train"], per_class=per_class, fraction=cfg["SAMPLE_FRACTION"] or None,
                             seed=cfg["SEED"])


def sample_record(items, data_dir):
    """[[path relative to DATA_DIR, label], ...] and its sha256: exactly what was measured."""
    root = data_dir if os.path.isdir(data_dir) else os.path.dirname(data_dir)
    record = [[os.path.relpath(p, root), int(y)] for p, y in items]
    return record, hashlib.sha256(json.dumps(record).encode()).hexdigest()


def sample_items(meta, data_dir):
    """[(path, label)] of the sample a saved capture measured (``sample_record`` read back)."""
    root = data_dir if os.path.isdir(data_dir) else os.path.dirname(data_dir)
    return [(os.path.join(root, p), y) for p, y in meta["sample"]["files"]]


def load_checked(path, checkpoint):
    """(stats, stats JSON) saved at ``path``, refused when they were measured on another checkpoint."""
    stats = load_tensors(path, "activation statistics")
    meta = read_json(os.path.splitext(path)[0] + ".json", "activation statistics")
    if meta.get("identity", {}).get("checkpoint_sha256") != sha256_file(checkpoint):
        raise PruneError(f"activation statistics {path} were measured on another checkpoint than {checkpoint}: "
                         "re-run visualize_neuron_activations.py")
    return stats, meta


def identity(cfg, checkpoint, items):
    """What makes two captures interchangeable."""
    _, digest = sample_record(items, cfg["DATA_DIR"])
    return {"checkpoint_sha256": sha256_file(checkpoint), "sample_sha256": digest,
            "capture_point": cfg["CAPTURE_POINT"], "image_size": cfg["IMAGE_SIZE"]}


def stale_reason(run_dir, ident):
    """Why the saved statistics cannot be re-used (None when they can)."""
    if not (os.path.exists(os.path.join(run_dir, STATS_PT)) and os.path.exists(os.path.join(run_dir, STATS_JSON))):
        return "no saved statistics"
    saved = read_json(os.path.join(run_dir, STATS_JSON), "activation statistics").get("identity", {})
    for key, value in ident.items():
        if saved.get(key) != value:
            return f"saved statistics were measured with another {key.replace('_', ' ')}"
    return None


_PROGRESS = ("resume/items_done", "resume/skipped_count", "resume/skipped_paths")  # saved with the partial totals


def _progress_tensors(items_done, skipped):
    """How far a partial capture got, as plain tensors saved in the same file as its totals (one atomic write):
    items consumed (readable or not) and the unreadable images met so far (their paths as UTF-8 JSON bytes)."""
    paths = torch.frombuffer(bytearray(json.dumps(skipped.paths).encode()), dtype=torch.uint8).clone()
    return {"resume/items_done": torch.tensor(items_done), "resume/skipped_count": torch.tensor(skipped.count),
            "resume/skipped_paths": paths}


def _resume_state(cfg, ident):
    """(state, items done, Skipped so far) of the partial save, refused when it was made for another capture."""
    partial = os.path.join(cfg["RUN_DIR"], PARTIAL)
    if not (cfg["RESUME"] and os.path.exists(partial)):
        return None, 0, Skipped()
    saved = read_json(partial + ".json", "partial capture").get("identity")
    if saved != {**ident, "batch_size": cfg["BATCH_SIZE"], "threshold": cfg["THRESHOLD"]}:
        raise PruneError(f"partial capture {partial} was made with another checkpoint, sample, capture point, "
                         "batch size or threshold: run without RESUME=True to start over")
    state = load_tensors(partial, "partial capture")
    if any(k not in state for k in _PROGRESS):
        raise PruneError(f"partial capture {partial} does not record how many images it consumed (made by an older "
                         "version): run without RESUME=True to start over")
    skipped = Skipped()
    skipped.count = int(state.pop("resume/skipped_count"))
    skipped.paths = json.loads(bytes(state.pop("resume/skipped_paths").tolist()).decode())
    done = int(state.pop("resume/items_done"))
    print(f"resuming the capture after {int(state['n_batches'])} batches ({done} images) from {partial}")
    return state, done, skipped


def _counted(batches_, counter):
    """The batches, counting in ``counter[0]`` the readable images handed on."""
    for images, labels in batches_:
        counter[0] += len(labels)
        yield images, labels


def check_processes(cfg, images):
    """Several processes: no RESUME (partial saves are per process) and at least one image each."""
    world = distributed.world_size()
    if world > 1 and cfg["RESUME"]:
        raise PruneError(f"RESUME=True needs one process, not {world}: partial saves are off under torchrun")
    if images < world:
        raise PruneError(f"the sample has {images} images, fewer than the {world} processes: raise SAMPLES_PER_CLASS")


def _merged_skipped(skipped, items):
    """The unreadable images of every rank, the first ones in sample order (as one process would report)."""
    if distributed.world_size() == 1:
        return skipped
    position = {path: i for i, (path, _) in enumerate(items)}
    parts = distributed.gather((skipped.count, skipped.paths))
    merged = Skipped()
    merged.count = sum(count for count, _ in parts)
    merged.paths = sorted((p for _, paths in parts for p in paths), key=position.get)[:5]
    return merged


def run_capture(cfg, model, blocks, items, num_classes, device, ident):
    """Capture over ``items`` (resuming from the partial save with RESUME=True); returns (stats, layers, skipped).

    Under torchrun each process measures its shard of ``items`` and every process gets the summed totals.
    """
    partial = os.path.join(cfg["RUN_DIR"], PARTIAL)
    state, done, skipped = _resume_state(cfg, ident)
    sidecar = {"identity": {**ident, "batch_size": cfg["BATCH_SIZE"], "threshold": cfg["THRESHOLD"]}}
    save_every = cfg["SAVE_EVERY"] if distributed.world_size() == 1 else 0
    loader = stage.loader(cfg, distributed.shard(items)[done:])
    readable, skipped_before = [0], skipped.count

    def on_batch(i, live):
        if save_every and i % save_every == 0:  # every item consumed so far: readable, or unreadable and skipped
            consumed = done + readable[0] + skipped.count - skipped_before
            write_json(partial + ".json", sidecar)
            save_tensors(partial, {**C.finalize(live), **_progress_tensors(consumed, skipped)})

    try:
        stats, layers = C.capture(model, _counted(batches(loader, skipped, device), readable), blocks,
                                  cfg["CAPTURE_POINT"], cfg["THRESHOLD"], num_classes, device,
                                  progress=distributed.is_main(), state=state, on_batch=on_batch)
    except PruneError:
        if readable[0] or distributed.world_size() == 1:
            raise
        stats, layers = None, C.describe_layers(blocks, cfg["CAPTURE_POINT"])  # no readable image in this shard
    stats = _zeros_where_empty(stats, cfg["THRESHOLD"], items)
    return distributed.all_reduce_totals(stats), layers, _merged_skipped(skipped, items)


def _zeros_where_empty(stats, threshold, items):
    """Under torchrun, the totals of a rank whose shard had no readable image: zeros shaped like another rank's
    (so the sum is the other ranks' capture). Every rank takes part; ``stats`` is returned as it is elsewhere."""
    if distributed.world_size() == 1:
        return stats
    shapes = distributed.gather(None if stats is None else {k: (tuple(v.shape), v.dtype) for k, v in stats.items()})
    if stats is not None:
        return stats
    some = next((s for s in shapes if s is not None), None)
    if some is None:
        raise PruneError(f"no process could read any of the {len(items)} images of the sample (e.g. {items[0][0]})")
    stats = {k: torch.zeros(shape, dtype=dtype) for k, (shape, dtype) in some.items()}
    stats["hist_edges"], stats["threshold"] = C.hist_edges(), torch.tensor(float(threshold), dtype=torch.float64)
    return stats


def save(cfg, stats, layers, items, ident, checkpoint, widths, skipped, extra=None):
    """Write activation_stats.pt and .json atomically, then drop the partial save."""
    record, _ = sample_record(items, cfg["DATA_DIR"])
    pt = save_tensors(os.path.join(cfg["RUN_DIR"], STATS_PT), stats)
    meta = {"schema_version": 1, "kind": "mbv3prune-activation-stats", "identity": ident,
            "threshold": cfg["THRESHOLD"], "layers": layers, "widths": widths,
            "skipped_images": {"count": skipped.count, "first": skipped.paths},
            "sample": {"data_dir": cfg["DATA_DIR"], "images": len(record), "files": record},
            **(extra or {}), "provenance": provenance(cfg, {"checkpoint": checkpoint})}
    js = write_json(os.path.join(cfg["RUN_DIR"], STATS_JSON), meta)
    for leftover in (os.path.join(cfg["RUN_DIR"], PARTIAL), os.path.join(cfg["RUN_DIR"], PARTIAL + ".json")):
        if os.path.exists(leftover):
            os.remove(leftover)
    return pt, js


def load(run_dir):
    """(stats tensors, stats JSON) saved by ``save``."""
    return load_tensors(os.path.join(run_dir, STATS_PT), "activation statistics"), \
        read_json(os.path.join(run_dir, STATS_JSON), "activation statistics")


def _capture_reason(cfg, ident, force):
    """Why a capture is needed (None: the saved statistics fit)."""
    resuming = cfg["RESUME"] and os.path.exists(os.path.join(cfg["RUN_DIR"], PARTIAL))
    return "RECAPTURE=True" if force else "RESUME=True" if resuming else stale_reason(cfg["RUN_DIR"], ident)


def ensure_stats(cfg, model, blocks, splits, class_names, checkpoint, widths, device, force=False):
    """Saved statistics when they fit this config, else a fresh capture (saved). Returns (stats, meta, wrote).

    Under torchrun all processes share the capture; rank 0 gets the result, the others (None, None, []).
    A capture pass records its time in RUN_DIR/timings.json ("capture": seconds, images, processes).
    """
    items = sample(cfg, splits)
    check_processes(cfg, len(items))
    ident = identity(cfg, checkpoint, items)
    reason = distributed.from_main(lambda: _capture_reason(cfg, ident, force))
    if reason is None:
        if not distributed.is_main():
            return None, None, []
        stats, meta = load(cfg["RUN_DIR"])
        print(f"re-using {os.path.join(cfg['RUN_DIR'], STATS_PT)} (same checkpoint, sample, capture point)")
        return stats, meta, []
    world = distributed.world_size()
    print(f"capturing activations of {len(items)} images ({reason})" + (f" in {world} processes" if world > 1 else ""))
    t0 = time.perf_counter()
    stats, layers, skipped = run_capture(cfg, model, blocks, items, len(class_names), device, ident)
    if not distributed.is_main():
        return None, None, []
    record_timings(cfg["RUN_DIR"], "capture", {"seconds": time.perf_counter() - t0, "images": len(items),
                                               "processes": world})
    if skipped.count:
        print(skipped.summary())
    wrote = save(cfg, stats, layers, items, ident, checkpoint, widths, skipped)
    return stats, read_json(wrote[1]), list(wrote)


def check_threshold_in_range(threshold, name="THRESHOLD"):
    if not isinstance(threshold, (int, float)) or not 0 < threshold < 1e3:
        raise PruneError(f"{name}={threshold} must be a number in (0, 1000)")
    return float(threshold)

