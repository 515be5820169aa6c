"""Several processes under ``torchrun`` (PyTorch's own launcher): one per GPU, on one machine or several.

Launched by torchrun (``RANK`` and ``WORLD_SIZE`` in the environment), a stage calls ``setup(DEVICE)``: the
process joins the group (NCCL on CUDA, gloo on CPU), takes the GPU ``cuda:LOCAL_RANK``, and on every rank
but 0 its stdout goes to /dev/null (errors still reach stderr). Then:

- the capture gives each rank a disjoint ``shard`` of the sample (``items[rank::world]``: every image once,
  no padding) and ``all_reduce_totals`` adds the running totals of all ranks;
- training wraps the model in ``wrap`` (DistributedDataParallel) and reads the training set through a
  seeded DistributedSampler (``sampler``), one part per rank; it re-estimates BN on ``global_batches``;
- rank 0 alone writes artifacts: ``artifacts.atomic_write`` refuses any other rank.

A collective waits ``MBV3PRUNE_PG_TIMEOUT_S`` seconds (default 1800, torch's) for the other ranks, then fails.

Without torchrun every function here is a no-op and a stage runs in one process, as it always did.
"""

import atexit
import datetime
import os
import sys

import torch
import torch.distributed as dist

from .errors import PruneError

TIMEOUT_ENV = "MBV3PRUNE_PG_TIMEOUT_S"  # seconds a collective waits for the other ranks before failing (torch: 1800)
_UNREDUCED = ("hist_edges", "threshold")  # capture totals that are the same on every rank, not sums


def launched():
    """True when torchrun (or any ``env://`` launcher) started this process."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def active():
    return dist.is_available() and dist.is_initialized()


def rank():
    return dist.get_rank() if active() else 0


def world_size():
    return dist.get_world_size() if active() else 1


def is_main():
    return rank() == 0


def setup(device_request="auto"):
    """This process's device; under torchrun, also joins the process group (once) and silences ranks > 0."""
    from .models import pick_device

    device = pick_device(device_request)
    if not launched():
        return device
    if not dist.is_available():
        raise PruneError("started by torchrun, but this torch build has no torch.distributed")
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            if device.index >= torch.cuda.device_count():
                raise PruneError(
                    f"torchrun process with LOCAL_RANK={device.index} has no GPU of its own: this machine "
                    f"has {torch.cuda.device_count()}; lower --nproc_per_node"
                )
        elif int(os.environ["WORLD_SIZE"]) > 1:
            raise PruneError(
                f"DEVICE={device_request} under torchrun: every process takes cuda:LOCAL_RANK, use DEVICE=auto or cuda"
            )
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise PruneError(f"DEVICE={device_request} ({device.type}) cannot run under torchrun: use cuda or cpu")
    if not active():
        timeout = datetime.timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, "1800")))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timeout)
        atexit.register(cleanup)
    if not is_main():
        sys.stdout = open(os.devnull, "w")
    return device


def cleanup():
    """Leave the process group (registered at exit by ``setup``)."""
    if active():
        dist.destroy_process_group()


def barrier():
    if active():
        dist.barrier()


def shard(items):
    """This rank's part of ``items``: every ``world_size()``-th from ``rank()``. Disjoint, no padding."""
    return items[rank() :: world_size()]


def from_main(fn):
    """``fn()`` evaluated on rank 0 alone and sent to every rank: a decision that reads rank 0's files."""
    if not active():
        return fn()
    box = [fn() if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(obj):
    """[obj of rank 0, obj of rank 1, ...] on every rank (picklable objects)."""
    if not active():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def step_batches(images):
    """(images in this step over all ranks, image height, width) of a step whose batch here is ``images``
    (possibly empty): one small all-reduce, so that every rank decides alike to skip a step that no rank has
    images for, or to take part with a zero-weight substitute where only this rank has none."""
    n = images.shape[0]
    h, w = (images.shape[-2], images.shape[-1]) if n else (0, 0)
    if not active():
        return n, h, w
    mine = torch.tensor([n, int(n > 0), h, w], dtype=torch.int64, device=_comm_device())
    dist.all_reduce(mine)
    total, with_images, h_sum, w_sum = (int(v) for v in mine.cpu())
    return total, h_sum // max(1, with_images), w_sum // max(1, with_images)


def mean(value):
    """The mean of a number over the ranks (e.g. each rank's training loss)."""
    if not active():
        return float(value)
    total = torch.tensor([float(value)], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(total)
    return float(total) / world_size()


def _comm_device():
    """gloo reduces CPU tensors, NCCL CUDA ones."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


CHUNK = 2**25  # elements per all-reduce (256 MB of int64): the buffer moved to the GPU at once stays bounded


def all_reduce_totals(stats):
    """Capture totals (finalized: plain CPU tensors, int64 histograms) added across ranks, in place.

    SUM for counts, sums, histograms and ``n_batches``, MAX for ``max_abs``; ``hist_edges`` and ``threshold``
    are left as they are; second-moment triples are merged Chan-style (``moments.all_reduce_moments``), not
    summed. Few collectives: per (operation, dtype), tensors are flattened together into buffers
    of at most CHUNK elements (a larger tensor is reduced alone, CHUNK elements at a time), so thousands of
    classes never move the whole totals to the GPU at once.
    """
    if not active():
        return stats
    from .moments import MOMENT_SUFFIXES, all_reduce_moments, moment_prefixes

    merged = {p + s for p in moment_prefixes(stats) for s in MOMENT_SUFFIXES}  # Chan-merged, not summed
    groups = {}
    for key in sorted(k for k in stats if k not in _UNREDUCED and k not in merged):
        groups.setdefault((key.endswith("/max_abs"), str(stats[key].dtype)), []).append(key)
    for (is_max, _), keys in sorted(groups.items()):
        op = dist.ReduceOp.MAX if is_max else dist.ReduceOp.SUM
        for part in _chunks(stats, keys):
            _reduce_together(stats, part, op)
    return all_reduce_moments(stats)


def _chunks(stats, keys):
    """``keys`` in consecutive runs of at most CHUNK elements in all (a larger tensor alone)."""
    run, size = [], 0
    for k in keys:
        if run and size + stats[k].numel() > CHUNK:
            yield run
            run, size = [], 0
        run.append(k)
        size += stats[k].numel()
    if run:
        yield run


def _reduce_together(stats, keys, op):
    """All-reduce the tensors of ``keys`` as one flat buffer, CHUNK elements at a time."""
    flat = torch.cat([stats[k].reshape(-1) for k in keys]) if len(keys) > 1 else stats[keys[0]].reshape(-1).clone()
    for start in range(0, flat.numel(), CHUNK):
        piece = flat[start : start + CHUNK].to(_comm_device())
        dist.all_reduce(piece, op=op)
        flat[start : start + CHUNK] = piece.cpu()
    offset = 0
    for k in keys:
        n = stats[k].numel()
        stats[k] = flat[offset : offset + n].view(stats[k].shape).clone()
        offset += n


def sampler(dataset, shuffle, seed, drop_last):
    """A DistributedSampler (this rank's part of ``dataset``, reshuffled by ``set_epoch``), or None alone."""
    if not active():
        return None
    from torch.utils.data import DistributedSampler

    return DistributedSampler(dataset, world_size(), rank(), shuffle=shuffle, seed=seed, drop_last=drop_last)


def set_epoch(loader, epoch):
    """Tell a loader's DistributedSampler the epoch (its shuffle depends on it)."""
    if hasattr(loader.sampler, "set_epoch"):
        loader.sampler.set_epoch(epoch)


def global_batches(loader):
    """An un-sharded ``loader`` re-batched at world_size() x its batch size, in the same order (same sampler and
    generator): the batches one process at the global batch size reads. Alone, ``loader`` itself.

    BN re-estimation in train mode normalises with each batch's statistics, so its result depends on the batch
    size: N processes at batch B re-estimate as one process at N x B only on batches of N x B."""
    if world_size() == 1:
        return loader
    from torch.utils.data import DataLoader

    return DataLoader(
        loader.dataset,
        batch_size=loader.batch_size * world_size(),
        sampler=loader.sampler,
        drop_last=loader.drop_last,
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        generator=loader.generator,
        worker_init_fn=loader.worker_init_fn,
        pin_memory=loader.pin_memory,
    )


def wrap(model, device):
    """``model`` in DistributedDataParallel under torchrun (it broadcasts rank 0's weights), else ``model``."""
    if not active():
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


_BASE_SEED = []  # the seed before the first seed_ranks: repeated calls (one per fit) do not add up the offset


def seed_ranks():
    """With several ranks, reseed torch with ``first seed + rank``: each rank its own dropout and augmentation."""
    if world_size() > 1:
        if not _BASE_SEED:
            _BASE_SEED.append(torch.initial_seed())
        torch.manual_seed(_BASE_SEED[0] + rank())
