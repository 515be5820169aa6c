"""The capture stage's artifacts: the stratified sample, a resumable capture, activation_stats.pt / .json.

``activation_stats.pt`` holds the running totals (a dict of plain tensors, see ``capture``) and
``activation_stats.json`` what they were measured on: the sample (every file and label), capture point,
threshold, image size, the checkpoint's sha256 and widths, config and versions. A later stage re-uses them
unless they were measured on another checkpoint, sample, capture point or image size.
"""
import hashlib
import json
import os

from . import capture as C
from . import stage
from .artifacts import load_tensors, provenance, read_json, save_tensors, sha256_file, write_json
from .data import Skipped, batches, stratified_sample
from .errors import PruneError

STATS_PT, STATS_JSON, PARTIAL = "activation_stats.pt", "activation_stats.json", "activation_stats.partial.pt"
_KILL_AFTER = int(os.environ.get("MBV3PRUNE_TEST_KILL_AFTER_BATCHES", "0"))  # test-only: os._exit after N batches


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


def _resume_state(cfg, ident):
    """(state, batches done) of the partial save, refused when it was made for another capture."""
    partial = os.path.join(cfg["RUN_DIR"], PARTIAL)
    if not (cfg["RESUME"] and os.path.exists(partial)):
        return None, 0
    saved = read_json(partial + ".json", "partial capture").get("identity")
    if saved != {**ident, "batch_size": cfg["BATCH_SIZE"], "threshold": cfg["THRESHOLD"]}:
        raise PruneError(f"partial capture {partial} was made with another checkpoint, sample, capture point, "
                         "batch size or threshold: run without RESUME=True to start over")
    state = load_tensors(partial, "partial capture")
    print(f"resuming the capture after {int(state['n_batches'])} batches from {partial}")
    return state, int(state["n_batches"])


def run_capture(cfg, model, blocks, items, num_classes, device, ident):
    """Capture over ``items`` (resuming from the partial save with RESUME=True); returns (stats, layers, skipped)."""
    partial = os.path.join(cfg["RUN_DIR"], PARTIAL)
    state, done = _resume_state(cfg, ident)
    sidecar = {"identity": {**ident, "batch_size": cfg["BATCH_SIZE"], "threshold": cfg["THRESHOLD"]}}
    skipped = Skipped()
    loader = stage.loader(cfg, items[done * cfg["BATCH_SIZE"]:])

    def on_batch(i, live):
        if cfg["SAVE_EVERY"] and i % cfg["SAVE_EVERY"] == 0:
            write_json(partial + ".json", sidecar)
            save_tensors(partial, C.finalize(live))
        if _KILL_AFTER and i >= _KILL_AFTER:
            os._exit(17)

    stats, layers = C.capture(model, batches(loader, skipped, device), blocks, cfg["CAPTURE_POINT"], cfg["THRESHOLD"],
                              num_classes, device, state=state, on_batch=on_batch)
    return stats, layers, skipped


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


def ensure_stats(cfg, model, blocks, splits, class_names, checkpoint, widths, device, force=False):
    """Saved statistics when they fit this config, else a fresh capture (saved). Returns (stats, meta, wrote)."""
    items = sample(cfg, splits)
    ident = identity(cfg, checkpoint, items)
    resuming = cfg["RESUME"] and os.path.exists(os.path.join(cfg["RUN_DIR"], PARTIAL))
    reason = "RECAPTURE=True" if force else "RESUME=True" if resuming else stale_reason(cfg["RUN_DIR"], ident)
    if reason is None:
        stats, meta = load(cfg["RUN_DIR"])
        print(f"re-using {os.path.join(cfg['RUN_DIR'], STATS_PT)} (same checkpoint, sample, capture point)")
        return stats, meta, []
    print(f"capturing activations of {len(items)} images ({reason})")
    stats, layers, skipped = run_capture(cfg, model, blocks, items, len(class_names), device, ident)
    if skipped.count:
        print(skipped.summary())
    wrote = save(cfg, stats, layers, items, ident, checkpoint, widths, skipped)
    return stats, read_json(wrote[1]), list(wrote)


def check_threshold_in_range(threshold, name="THRESHOLD"):
    if not isinstance(threshold, (int, float)) or not 0 < threshold < 1e3:
        raise PruneError(f"{name}={threshold} must be a number in (0, 1000)")
    return float(threshold)

