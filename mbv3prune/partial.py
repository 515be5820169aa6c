"""Partial saves of a capture whose cost does not grow with the number of classes.

A partial save is a base file (every total that is not per class, how many items were consumed, the
unreadable images met) plus numbered row files ``<base>.rowsNNNNN.pt``, each holding the per-class rows
(``hist_class``, ``sum_abs_class``, ``n_class``) of the classes met since the save before. A save writes only
those rows, then the base naming how many row files it covers (each file atomic: a kill leaves the previous
save whole). When the rows written since the last full snapshot would pass the class count, the save is a
full snapshot instead (and the row files are dropped), so the disk holds at most about twice the totals and
a save's cost is bounded by the images between saves, amortised, not by the classes.
"""

import glob
import json
import os

import torch

from . import capture as C
from .artifacts import load_tensors, save_tensors
from .data import Skipped
from .errors import PruneError

PER_CLASS_SUFFIXES = ("/hist_class", "/sum_abs_class", "/n_class")  # totals with one row per class
_META = (
    "resume/items_done",
    "resume/skipped_count",
    "resume/skipped_paths",
    "resume/row_files",
    "resume/rows_since_full",
    "resume/num_classes",
)


def _per_class(key):
    return key.endswith(PER_CLASS_SUFFIXES)


def _rows_path(base, i):
    return f"{base}.rows{i:05d}.pt"


def remove(base):
    """Remove a partial save (base, its JSON sidecar and row files)."""
    for path in [base, base + ".json", *glob.glob(glob.escape(base) + ".rows*.pt")]:
        if os.path.exists(path):
            os.remove(path)


class PartialSaves:
    """Writes the partial saves of one capture; ``touch(labels)`` records the classes each batch met."""

    def __init__(self, base, num_classes, row_files=0, rows_since_full=0):
        self.base, self.num_classes = base, num_classes
        self.row_files, self.rows_since_full, self.touched = row_files, rows_since_full, set()

    def touch(self, labels):
        self.touched.update(labels.tolist())

    def save(self, live, items_done, skipped):
        """Save the live state (per-class rows of the classes met since the last save only)."""
        classes = sorted(self.touched)
        full = self.rows_since_full + len(classes) > self.num_classes
        if not full:
            idx = torch.tensor(classes, dtype=torch.long)
            rows = {k: v[idx.to(v.device)] for k, v in live.items() if _per_class(k)}
            rows = {k: v for k, v in C.finalize(rows, copy=False).items() if _per_class(k)}  # no summed hist
            save_tensors(_rows_path(self.base, self.row_files + 1), {"classes": idx, **rows})
            self.row_files, self.rows_since_full = self.row_files + 1, self.rows_since_full + len(classes)
        else:
            self.row_files, self.rows_since_full = 0, 0
        kept = live if full else {k: v for k, v in live.items() if not _per_class(k)}
        save_tensors(self.base, {**C.finalize(kept), **self._meta(items_done, skipped)})
        if full:
            for stale in glob.glob(glob.escape(self.base) + ".rows*.pt"):
                os.remove(stale)
        self.touched.clear()

    def _meta(self, items_done, skipped):
        paths = torch.frombuffer(bytearray(json.dumps(skipped.paths).encode()), dtype=torch.uint8).clone()
        return {
            "resume/items_done": torch.tensor(items_done),
            "resume/skipped_count": torch.tensor(skipped.count),
            "resume/skipped_paths": paths,
            "resume/row_files": torch.tensor(self.row_files),
            "resume/rows_since_full": torch.tensor(self.rows_since_full),
            "resume/num_classes": torch.tensor(self.num_classes),
        }


def load(base):
    """(capture state, items done, Skipped so far, PartialSaves to continue with) of a partial save."""
    state = load_tensors(base, "partial capture")
    if any(k not in state for k in _META):
        raise PruneError(
            f"partial capture {base} does not record how many images it consumed (made by an older "
            "version): run without RESUME=True to start over"
        )
    skipped = Skipped()
    skipped.count = int(state.pop("resume/skipped_count"))
    skipped.paths = json.loads(bytes(state.pop("resume/skipped_paths").tolist()).decode())
    done, row_files = int(state.pop("resume/items_done")), int(state.pop("resume/row_files"))
    since, num_classes = int(state.pop("resume/rows_since_full")), int(state.pop("resume/num_classes"))
    for i in range(1, row_files + 1):
        rows = load_tensors(_rows_path(base, i), "partial capture rows")
        idx = rows.pop("classes")
        for key, value in rows.items():
            if key not in state:
                state[key] = torch.zeros((num_classes, *value.shape[1:]), dtype=value.dtype)
            state[key][idx] = value
    return state, done, skipped, PartialSaves(base, num_classes, row_files, since)
