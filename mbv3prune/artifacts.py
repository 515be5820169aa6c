"""Atomic writes, JSON with a schema version, sha256, and the provenance every artifact carries.

Every artifact is written to a temporary file in its own directory and renamed into place, so a stage
killed at any moment leaves the previous artifact intact and readable. Under torchrun only rank 0 writes:
a write from another rank is a bug, and ``atomic_write`` refuses it.
"""

import glob
import hashlib
import importlib.metadata
import json
import math
import os
import socket
import tempfile

import torch

from .errors import PruneError

SCHEMA_VERSION = 1


def _temp_prefix(path):
    """``.name.host.pid.``: whose temporary file it is (a killed writer's is recognised by its dead pid)."""
    return f".{os.path.basename(path)}.{socket.gethostname()}.{os.getpid()}."


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _remove_dead_writers_temps(path):
    """Remove the temporary files of ``path`` left by killed writers on this host; never a live writer's."""
    directory, name = os.path.split(path)
    host = socket.gethostname()
    for tmp in glob.glob(os.path.join(glob.escape(directory), f".{glob.escape(name)}.{glob.escape(host)}.*.tmp")):
        pid = os.path.basename(tmp)[len(f".{name}.{host}.") :].split(".")[0]
        if pid.isdigit() and not _alive(int(pid)):
            os.remove(tmp)


def _fsync(path):
    """Flush ``path`` (a file, or a directory after a rename) to disk; a directory that cannot be opened is left."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path, write):
    """Call ``write(tmp_path)`` on a temporary file of its own beside ``path``, fsync it, rename it into place.

    The temporary name is unique (host, pid, random part); on failure only this call's temporary file is
    removed, and those of writers killed on this host earlier, never another live writer's. Returns ``path``.
    """
    path = os.fspath(path)
    _check_writer(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    _remove_dead_writers_temps(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=_temp_prefix(path), suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync(directory)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def _check_writer(path):
    """Under torchrun, rank 0 alone writes artifacts (the others would race it on a shared file system)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        raise RuntimeError(f"rank {torch.distributed.get_rank()} tried to write {path}: only rank 0 writes artifacts")


def _clean(obj):
    """JSON-safe copy: tensors and numpy values become lists and numbers, NaN becomes None."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if hasattr(obj, "tolist"):
        return _clean(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_json(path, obj):
    """Write ``obj`` as indented JSON atomically; the same object always gives the same bytes."""
    return write_text(path, json.dumps(_clean(obj), indent=2) + "\n")


def write_text(path, text):
    """Write ``text`` (UTF-8) atomically; returns the path."""

    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    return atomic_write(path, write)


def read_json(path, what="JSON file"):
    """Read a JSON file; a missing or malformed one is a PruneError naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise PruneError(f"{what} {path} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise PruneError(f"{what} {path} is not readable JSON: {err}") from None


def save_torch(path, obj):
    """``torch.save`` atomically through a file object, so the bytes do not depend on the temporary name."""

    def write(tmp):
        with open(tmp, "wb") as f:
            torch.save(obj, f)

    return atomic_write(path, write)


def save_tensors(path, tensors):
    """Save a dict of plain tensors (loads with ``torch.load(weights_only=True)``)."""
    return save_torch(path, tensors)


def load_tensors(path, what="tensor file"):
    """Load a dict of plain tensors saved by ``save_tensors``."""
    if not os.path.exists(path):
        raise PruneError(f"{what} {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a corrupt file
        raise PruneError(f"{what} {path} cannot be read: {type(err).__name__}: {str(err).splitlines()[0]}") from None


def save_figure(fig, path, dpi=110):
    """Save a matplotlib figure atomically and close it."""
    import matplotlib.pyplot as plt

    ext = os.path.splitext(path)[1].lstrip(".") or "png"
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format=ext, metadata={"Software": None}))
    plt.close(fig)
    return path


def sha256_file(path):
    """The sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def versions():
    """Versions of what shaped the result (from package metadata; torch-pruning's __version__ is stale)."""
    out = {}
    for pkg in ("torch", "torchvision", "torch-pruning", "numpy"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def provenance(cfg, inputs=None):
    """Where an artifact came from: the resolved config, sha256 of its input files, versions."""
    return {
        "schema_version": SCHEMA_VERSION,
        "config": dict(sorted(cfg.items())),
        "inputs": {
            name: {"path": os.fspath(p), "sha256": sha256_file(p)} for name, p in sorted((inputs or {}).items())
        },
        "versions": versions(),
    }


def record_timings(run_dir, stage, seconds):
    """Merge a stage's timings into ``RUN_DIR/timings.json`` (kept out of reports so they compare byte for byte)."""
    import time

    path = os.path.join(run_dir, "timings.json")
    timings = read_json(path) if os.path.exists(path) else {}
    timings[stage] = {"finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"), **{k: round(v, 3) for k, v in seconds.items()}}
    write_json(path, timings)
