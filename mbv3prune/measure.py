"""The capture stage's artifacts: the stratified sample, a resumable capture, activation_stats.pt / .json.

``activation_stats.pt`` holds the running totals (a dict of plain tensors, see ``capture``) and
``activation_stats.json`` what they were measured on: the sample (every file and label; beyond FILES_LISTED
images its sampling rule and sha256, from which ``sample_items`` recovers it), what was kept per class, capture point,
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
from . import partial as P
from .activation_stats import ActivationStats
from .artifacts import load_tensors, provenance, read_json, record_timings, save_tensors, sha256_file, write_json
from .data import Skipped, batches, discover, stratified_sample
from .errors import PruneError

STATS_PT, STATS_JSON, PARTIAL = "activation_stats.pt", "activation_stats.json", "activation_stats.partial.pt"


def sample(cfg, splits):
    """The stratified sample of the training split that every capture of this config measures."""
    per_class = cfg["SAMPLES_PER_CLASS"] if not cfg["SAMPLE_FRACTION"] else None
    return stratified_sample(
        splits["train"], per_class=per_class, fraction=cfg["SAMPLE_FRACTION"] or None, seed=cfg["SEED"]
    )


def _root(data_dir):
    """The folder a sample's paths are relative to: DATA_DIR, or a CSV manifest's folder."""
    return data_dir if os.path.isdir(data_dir) else os.path.dirname(data_dir)


def sample_record(items, data_dir):
    """[[path relative to DATA_DIR, label], ...] and its sha256: exactly what was measured."""
    root = _root(data_dir)
    record = [[os.path.relpath(p, root), int(y)] for p, y in items]
    return record, hashlib.sha256(json.dumps(record).encode()).hexdigest()


FILES_LISTED = 5000  # a larger sample is recorded by its sampling rule and sha256, not file by file


def sample_meta(cfg, items):
    """The sample part of activation_stats.json: every file, or for a sample of more than FILES_LISTED images
    the rule that drew it (DATA_DIR, SEED, SAMPLES_PER_CLASS / SAMPLE_FRACTION) and the sha256 that checks it."""
    record, digest = sample_record(items, cfg["DATA_DIR"])
    meta = {"data_dir": cfg["DATA_DIR"], "images": len(record), "sha256": digest}
    if len(record) <= FILES_LISTED:
        return {**meta, "files": record}
    rule = {k: cfg[k] for k in ("SEED", "SAMPLES_PER_CLASS", "SAMPLE_FRACTION")}
    return {**meta, "rule": {**rule, "SPLIT_SEED": stage.split_seed(cfg)}}


def check_sample_in_train(meta, splits, cfg, path):
    """PruneError when a capture's sample was not drawn from this train split: statistics of the model's own
    val images would bias every choice made on val (and the refit runs on the sample)."""
    sample = meta.get("sample", {})
    if "rule" in sample:
        inside = stage.split_seed(sample["rule"]) == stage.split_seed(cfg)
    elif "files" in sample:
        root = _root(cfg["DATA_DIR"])
        train = {os.path.normpath(p) for p, _ in splits["train"]}
        inside = all(os.path.normpath(os.path.join(root, p)) in train for p, _ in sample["files"])
    else:
        return
    if not inside:
        raise PruneError(
            f"{path} was captured on images outside this train split (drawn with another split seed?): "
            "re-run visualize_neuron_activations.py"
        )


def sample_items(meta, data_dir):
    """[(path, label)] of the sample a saved capture measured: its file list, or its rule drawn again from
    ``data_dir`` (refused when that no longer gives the recorded sha256)."""
    root = _root(data_dir)
    if "files" in meta["sample"]:
        return [(os.path.join(root, p), y) for p, y in meta["sample"]["files"]]
    rule = meta["sample"]["rule"]
    splits, _ = discover(data_dir, seed=stage.split_seed(rule))
    items = sample({**rule, "DATA_DIR": data_dir}, splits)
    if sample_record(items, data_dir)[1] != meta["sample"]["sha256"]:
        raise PruneError(
            f"DATA_DIR {data_dir} no longer gives the {meta['sample']['images']} images the statistics "
            "were measured on (its files changed): re-run visualize_neuron_activations.py"
        )
    return items


def per_class_mode(cfg, blocks, num_classes):
    """What the capture keeps per class: PER_CLASS, or for "auto" per-class histograms while their totals fit in
    MAX_STATS_MEMORY_GB, else per-class counts and means (said in one line). CLASS_AWARE needs histograms."""
    want, limit = cfg.get("PER_CLASS", "auto"), cfg.get("MAX_STATS_MEMORY_GB", 4.0)
    channels = [info["channels"] for info in C.describe_layers(blocks, cfg["CAPTURE_POINT"]).values()]
    need = C.per_class_bytes(channels, num_classes, "histograms") / 2**30
    mode = want if want != "auto" else "histograms" if need <= limit else "counts"
    C.valid_per_class(mode)
    if want == "auto" and mode != "histograms":
        print(
            f"per-class histograms of {num_classes} classes would take {need:.1f} GB > MAX_STATS_MEMORY_GB={limit}: "
            "keeping per-class counts and mean |a| instead (PER_CLASS=histograms to force them)"
        )
    if cfg.get("CLASS_AWARE") and mode != "histograms":
        raise PruneError(
            f"CLASS_AWARE=True needs per-class histograms, which PER_CLASS={want} does not keep for "
            f"{num_classes} classes ({need:.1f} GB, MAX_STATS_MEMORY_GB={limit}): raise "
            "MAX_STATS_MEMORY_GB, set PER_CLASS=histograms, or CLASS_AWARE=False"
        )
    return mode


def check_per_class_histograms(cfg, stats, path):
    """With CLASS_AWARE, saved statistics without per-class histograms are refused in one line."""
    if cfg.get("CLASS_AWARE") and not ActivationStats.of(stats).has_any_class_hist():
        raise PruneError(
            f"CLASS_AWARE=True needs per-class histograms, but {path} has none (captured with "
            "PER_CLASS=counts or off): re-run with RECAPTURE=True PER_CLASS=histograms"
        )


def check_second_moments(stats, path, needed_by):
    """Saved statistics without second moments are refused in one line naming the file, when ``needed_by``
    (e.g. ``"SCORE=obs"``; None or "": nothing needs them) needs the project-input covariances."""
    if needed_by and not ActivationStats.of(stats).has_any_second_moments():
        raise PruneError(
            f"{needed_by} needs second moments, but {path} has none (captured with SECOND_MOMENTS=False): "
            "re-run visualize_neuron_activations.py with SECOND_MOMENTS=True RECAPTURE=True"
        )


def load_checked(path, checkpoint):
    """(stats, stats JSON) saved at ``path``, refused when they were measured on another checkpoint."""
    stats = load_tensors(path, "activation statistics")
    meta = read_json(os.path.splitext(path)[0] + ".json", "activation statistics")
    if meta.get("identity", {}).get("checkpoint_sha256") != sha256_file(checkpoint):
        raise PruneError(
            f"activation statistics {path} were measured on another checkpoint than {checkpoint}: "
            "re-run visualize_neuron_activations.py"
        )
    return stats, meta


def identity(cfg, checkpoint, items, per_class="histograms"):
    """What makes two captures interchangeable."""
    _, digest = sample_record(items, cfg["DATA_DIR"])
    return {
        "checkpoint_sha256": sha256_file(checkpoint),
        "sample_sha256": digest,
        "capture_point": cfg["CAPTURE_POINT"],
        "image_size": cfg["IMAGE_SIZE"],
        "per_class": per_class,
        "hist_positions_per_image": hist_positions(cfg),
        **(
            {"second_moments": True, "cov_positions_per_image": cfg.get("COV_POSITIONS_PER_IMAGE") or 0}
            if cfg.get("SECOND_MOMENTS")
            else {}
        ),
    }


def stale_reason(run_dir, ident):
    """Why the saved statistics cannot be re-used (None when they can)."""
    if not (os.path.exists(os.path.join(run_dir, STATS_PT)) and os.path.exists(os.path.join(run_dir, STATS_JSON))):
        return "no saved statistics"
    saved = read_json(os.path.join(run_dir, STATS_JSON), "activation statistics").get("identity", {})
    saved = {"hist_positions_per_image": 0, **saved}  # statistics from before the key counted every position
    for key, value in ident.items():
        every_position = key.endswith("_positions_per_image") and saved.get(key) == 0  # fits any sample asked
        if saved.get(key) != value and not every_position:
            return f"saved statistics were measured with another {key.replace('_', ' ')}"
    return None


def _resume_state(cfg, ident, num_classes):
    """(state, items done, Skipped so far, PartialSaves) of the partial save, refused when it was made for another
    capture; a fresh start without RESUME=True."""
    partial = os.path.join(cfg["RUN_DIR"], PARTIAL)
    if not (cfg["RESUME"] and os.path.exists(partial)):
        return None, 0, Skipped(), P.PartialSaves(partial, num_classes)
    saved = read_json(partial + ".json", "partial capture").get("identity")
    if saved != {**ident, "batch_size": cfg["BATCH_SIZE"], "threshold": cfg["THRESHOLD"]}:
        raise PruneError(
            f"partial capture {partial} was made with another checkpoint, sample, capture point, "
            "batch size or threshold: run without RESUME=True to start over"
        )
    state, done, skipped, saves = P.load(partial)
    print(f"resuming the capture after {int(state['n_batches'])} batches ({done} images) from {partial}")
    return state, done, skipped, saves


def _counted(batches_, counter, saves):
    """The batches, counting in ``counter[0]`` the readable images handed on and telling ``saves`` their classes."""
    for images, labels in batches_:
        counter[0] += len(labels)
        saves.touch(labels)
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


def run_capture(cfg, model, blocks, items, num_classes, device, ident, per_class="histograms"):
    """Capture over ``items`` (resuming from the partial save with RESUME=True); returns (stats, layers, skipped).

    Under torchrun each process measures its shard of ``items`` and every process gets the summed totals.
    """
    partial = os.path.join(cfg["RUN_DIR"], PARTIAL)
    state, done, skipped, saves = _resume_state(cfg, ident, num_classes)
    sidecar = {"identity": {**ident, "batch_size": cfg["BATCH_SIZE"], "threshold": cfg["THRESHOLD"]}}
    save_every = cfg["SAVE_EVERY"] if distributed.world_size() == 1 else 0
    loader = stage.loader(cfg, distributed.shard(items)[done:])
    readable, skipped_before = [0], skipped.count

    def on_batch(i, live):
        consumed = done + readable[0] + skipped.count - skipped_before  # readable, or unreadable and skipped
        write_json(partial + ".json", sidecar)
        saves.save(live, consumed, skipped)

    try:
        stats, layers = C.capture(
            model,
            _counted(batches(loader, skipped, device, labels_on_device=False), readable, saves),
            blocks,
            cfg["CAPTURE_POINT"],
            cfg["THRESHOLD"],
            num_classes,
            device,
            progress=distributed.is_main(),
            state=state,
            on_batch=on_batch if save_every else None,
            on_batch_every=save_every or 1,
            per_class=per_class,
            second_moments=cfg.get("SECOND_MOMENTS", False),
            positions_per_image=cfg.get("COV_POSITIONS_PER_IMAGE"),
            hist_positions_per_image=hist_positions(cfg),
        )
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
    pt = save_tensors(os.path.join(cfg["RUN_DIR"], STATS_PT), stats)
    meta = {
        "schema_version": 1,
        "kind": "mbv3prune-activation-stats",
        "identity": ident,
        "threshold": cfg["THRESHOLD"],
        "layers": layers,
        "widths": widths,
        "skipped_images": {"count": skipped.count, "first": skipped.paths},
        "per_class": ident.get("per_class", "histograms"),
        "sample": sample_meta(cfg, items),
        **(extra or {}),
        "provenance": provenance(cfg, {"checkpoint": checkpoint}),
    }
    js = write_json(os.path.join(cfg["RUN_DIR"], STATS_JSON), meta)
    P.remove(os.path.join(cfg["RUN_DIR"], PARTIAL))
    return pt, js


def load(run_dir):
    """(stats tensors, stats JSON) saved by ``save``."""
    return load_tensors(os.path.join(run_dir, STATS_PT), "activation statistics"), read_json(
        os.path.join(run_dir, STATS_JSON), "activation statistics"
    )


def _capture_reason(cfg, ident, force):
    """Why a capture is needed (None: the saved statistics fit)."""
    resuming = cfg["RESUME"] and os.path.exists(os.path.join(cfg["RUN_DIR"], PARTIAL))
    return "RECAPTURE=True" if force else "RESUME=True" if resuming else stale_reason(cfg["RUN_DIR"], ident)


def hist_positions(cfg):
    """Positions per image the histograms count: HIST_POSITIONS_PER_IMAGE (0 = every position), but every
    position with CLASS_AWARE, whose per-class deadness (a minimum over classes of small samples) a sampled
    count would bias toward sparing channels."""
    return 0 if cfg.get("CLASS_AWARE") else cfg.get("HIST_POSITIONS_PER_IMAGE") or 0


def check_positions(cfg):
    """A PruneError naming the key when a positions-per-image setting is negative."""
    for key in ("COV_POSITIONS_PER_IMAGE", "HIST_POSITIONS_PER_IMAGE"):
        if (cfg.get(key) or 0) < 0:
            raise PruneError(f"{key}={cfg[key]} must be 0 (every position) or a positive number of positions")


def ensure_stats(cfg, model, blocks, splits, class_names, checkpoint, widths, device, force=False):
    """Saved statistics when they fit this config, else a fresh capture (saved). Returns (stats, meta, wrote).

    Under torchrun all processes share the capture; rank 0 gets the result, the others (None, None, []).
    A capture pass records its time in RUN_DIR/timings.json ("capture": seconds, images, processes).
    """
    check_positions(cfg)
    items = sample(cfg, splits)
    check_processes(cfg, len(items))
    per_class = per_class_mode(cfg, blocks, len(class_names))
    ident = identity(cfg, checkpoint, items, per_class)
    reason = distributed.from_main(lambda: _capture_reason(cfg, ident, force))
    if reason is None:
        if not distributed.is_main():
            return None, None, []
        stats, meta = load(cfg["RUN_DIR"])
        check_per_class_histograms(cfg, stats, os.path.join(cfg["RUN_DIR"], STATS_PT))
        print(f"re-using {os.path.join(cfg['RUN_DIR'], STATS_PT)} (same checkpoint, sample, capture point)")
        return stats, meta, []
    world = distributed.world_size()
    print(f"capturing activations of {len(items)} images ({reason})" + (f" in {world} processes" if world > 1 else ""))
    t0 = time.perf_counter()
    stats, layers, skipped = run_capture(cfg, model, blocks, items, len(class_names), device, ident, per_class)
    if not distributed.is_main():
        return None, None, []
    record_timings(
        cfg["RUN_DIR"], "capture", {"seconds": time.perf_counter() - t0, "images": len(items), "processes": world}
    )
    if skipped.count:
        print(skipped.summary())
    wrote = save(cfg, stats, layers, items, ident, checkpoint, widths, skipped)
    return stats, read_json(wrote[1]), list(wrote)
