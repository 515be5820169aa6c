"""Several processes under torchrun, on the CPU with gloo: the capture equals one process's, DDP training at
2 x batch 4 equals one process at batch 8 (BN re-estimation included), and only rank 0 writes."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from mbv3prune import distributed, measure, models
from mbv3prune.artifacts import write_json
from mbv3prune.blocks import find_blocks
from mbv3prune.capture import capture
from mbv3prune.errors import PruneError
from mbv3prune.train import seed_everything
from tests.helpers import ROOT, randomized_model, write_images

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available",
)
ARCH = "mobilenet_v3_small"
COMMON = [f"--MODEL_ARCH={ARCH}", "--IMAGE_SIZE=32", "--NUM_WORKERS=0", "--DEVICE=cpu"]
EXACT = ["--COV_POSITIONS_PER_IMAGE=0", "--HIST_POSITIONS_PER_IMAGE=0"]  # every position: samples differ by sharding


def torchrun(nproc, script, *args):
    """``torchrun --standalone --nproc_per_node=nproc script args`` with one thread per process; a collective
    that waits 60 s fails (a deadlock fails the test rather than hanging it), and so does a run past 300 s."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    env[distributed.TIMEOUT_ENV] = "120"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            os.path.join(ROOT, script),
            *args,
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"torchrun {script} exited {result.returncode}: {result.stderr[-3000:]}"
    return result.stdout


def single(*args):
    """The capture stage in one plain process (no torchrun) with one thread."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "visualize_neuron_activations.py"), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_shard_is_disjoint_covers_every_item_once_and_pads_nothing(monkeypatch, world):
    items = [(f"img{i}.png", i % 3) for i in range(13)]
    monkeypatch.setattr(distributed, "world_size", lambda: world)
    parts = []
    for r in range(world):
        monkeypatch.setattr(distributed, "rank", lambda r=r: r)
        parts.append(distributed.shard(items))
    assert sorted(x for part in parts for x in part) == sorted(items)  # each item exactly once
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


@pytest.mark.parametrize("chunk", [None, 1000])
def test_reduce_in_a_one_process_group_keeps_totals_and_dtypes(monkeypatch, chunk):
    model = randomized_model(ARCH)
    gen = torch.Generator().manual_seed(0)
    stats, _ = capture(
        model,
        [(torch.randn(4, 3, 32, 32, generator=gen), torch.tensor([0, 1, 2, 0]))],
        find_blocks(model),
        num_classes=3,
        progress=False,
    )
    expected = {k: v.clone() for k, v in stats.items()}
    sizes = []
    if chunk:  # thousands of classes: no buffer passes CHUNK elements
        monkeypatch.setattr(distributed, "CHUNK", chunk)
        reduce = dist.all_reduce
        monkeypatch.setattr(
            dist, "all_reduce", lambda t, op=dist.ReduceOp.SUM: (sizes.append(t.numel()), reduce(t, op=op))
        )
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        reduced = distributed.all_reduce_totals(stats)
        assert distributed.gather("x") == ["x"] and distributed.mean(2.5) == 2.5
    finally:
        dist.destroy_process_group()
    assert reduced.keys() == expected.keys()
    for k, v in expected.items():
        assert reduced[k].dtype == v.dtype and torch.equal(reduced[k], v), k
    if chunk:
        assert sizes and max(sizes) <= chunk and sum(sizes) > 10 * chunk


def test_only_rank_0_writes(monkeypatch, tmp_path):
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 1)
    with pytest.raises(RuntimeError, match="only rank 0 writes"):
        write_json(tmp_path / "x.json", {})
    assert not os.listdir(tmp_path)


def test_resume_and_a_too_small_sample_are_refused_with_several_processes(monkeypatch):
    monkeypatch.setattr(distributed, "world_size", lambda: 4)
    with pytest.raises(PruneError, match="RESUME=True needs one process"):
        measure.check_processes({"RESUME": True}, 100)
    with pytest.raises(PruneError, match="fewer than the 4 processes"):
        measure.check_processes({"RESUME": False}, 3)


def test_channels_last_capture_equals_contiguous_to_rounding():
    """The CUDA layout (model and images channels_last), checked on the CPU: same totals up to float rounding."""
    gen = torch.Generator().manual_seed(0)
    data = [(torch.randn(4, 3, 32, 32, generator=gen), torch.tensor([0, 1, 2, 0])) for _ in range(2)]
    results = []
    for fmt in (torch.contiguous_format, torch.channels_last):
        model = randomized_model(ARCH).to(memory_format=fmt)
        stats, _ = capture(
            model, [(x.to(memory_format=fmt), y) for x, y in data], find_blocks(model), num_classes=3, progress=False
        )
        results.append(stats)
    plain, last = results
    for k, v in plain.items():
        if v.dtype.is_floating_point:
            torch.testing.assert_close(last[k], v, rtol=1e-3, atol=1e-3 * float(v.abs().max()), msg=k)
        else:  # an activation at a threshold or bin edge may move by rounding: a few counts at most
            assert float((last[k] - v).abs().sum()) <= 1e-3 * max(1, float(v.abs().sum())), k


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("ddp_checkpoint") / "baseline.pt")
    models.save_checkpoint(path, randomized_model(ARCH), ARCH, ["ant", "bee", "moth"])
    return path


def test_capture_under_torchrun_equals_one_process(tiny_data, checkpoint, tmp_path):
    args = [
        f"--DATA_DIR={tiny_data}",
        f"--CHECKPOINT={checkpoint}",
        *COMMON,
        *EXACT,
        "--BATCH_SIZE=3",
        "--SAMPLES_PER_CLASS=6",
    ]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    single(f"--RUN_DIR={one}", *args)  # one thread like each torchrun process: the same float rounding
    out = torchrun(2, "visualize_neuron_activations.py", f"--RUN_DIR={two}", *args)
    assert "in 2 processes" in out and out.count("wrote:") == 1  # rank 1 prints nothing
    a, b = (torch.load(os.path.join(d, "activation_stats.pt"), weights_only=True) for d in (one, two))
    assert a.keys() == b.keys()
    for k, v in a.items():
        if v.is_floating_point() and k not in ("hist_edges", "threshold"):  # sums and max |a|: float rounding
            torch.testing.assert_close(b[k], v, rtol=1e-6, atol=1e-6 * float(v.abs().max()), msg=k)
        else:  # counts, histograms, per-class counts, n_batches (6 batches of 3 either way): exact
            assert torch.equal(b[k], v), k
    ja, jb = (json.load(open(os.path.join(d, "activation_stats.json"))) for d in (one, two))
    assert {k: v for k, v in ja.items() if k != "provenance"} == {k: v for k, v in jb.items() if k != "provenance"}
    assert json.load(open(os.path.join(two, "timings.json")))["capture"]["processes"] == 2


def test_ddp_two_processes_at_batch_4_equal_one_at_batch_8(tmp_path):
    """Same samples per step (DistributedSampler, same seed), BN frozen, no augmentation or dropout; two epochs,
    so the second trains with the BN statistics re-estimated after the first (on batches of 2 x 4 = 8)."""
    data = tmp_path / "data"
    for c, name in enumerate(["ant", "bee", "moth"]):
        write_images(data / "train" / name, 11, seed=c, size=32)  # 33 images: 4 steps at 8 (or 2 x 4)
        write_images(data / "val" / name, 2, seed=100 + c, size=32)
    args = [
        f"--DATA_DIR={data}",
        *COMMON,
        "--EPOCHS=2",
        "--BN_BATCHES=2",
        "--FREEZE_BN=True",
        "--AUGMENT=False",
        "--DROPOUT=0.0",
    ]
    torchrun(1, "train_model.py", f"--RUN_DIR={tmp_path / 'one'}", "--BATCH_SIZE=8", *args)
    out = torchrun(2, "train_model.py", f"--RUN_DIR={tmp_path / 'two'}", "--BATCH_SIZE=4", *args)
    assert out.count("wrote:") == 1 and "2 processes x 4 images per batch" in out
    h1, h2 = (json.load(open(tmp_path / d / "train_metrics.json"))["history"] for d in ("one", "two"))
    assert [h["val_top1"] for h in h2] == [h["val_top1"] for h in h1]
    for a, b in zip(h1, h2):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-3), a["epoch"]
    (one, _), (two, meta) = (models.load_checkpoint(str(tmp_path / d / "baseline.pt")) for d in ("one", "two"))
    assert meta["extra"]["processes"] == 2
    seed_everything(0)
    initial = models.build_model(ARCH, 3)
    initial, p1, p2 = ({k: p.detach() for k, p in m.named_parameters()} for m in (initial, one, two))
    assert max(float((p1[k] - initial[k]).abs().max()) for k in p1) > 1e-3  # the steps did move the weights
    for k in p1:
        torch.testing.assert_close(p2[k], p1[k], rtol=1e-4, atol=1e-5, msg=k)
    b1, b2 = (dict(m.named_buffers()) for m in (one, two))
    for k in b1:  # the re-estimated BN statistics of the best epoch
        torch.testing.assert_close(b2[k], b1[k], rtol=1e-4, atol=1e-5, msg=k)


def _spoil(path):
    with open(path, "wb") as f:
        f.write(b"not an image")


def _same_stats(a, b, ignore=()):
    """Counts of images and elements exact; sums to float rounding; other counts (below a threshold, per bin) up
    to a few values that rounding moved across an edge: the batches differ (2 images, 1 readable, vs 2 readable)."""
    assert a.keys() == b.keys()
    for k, v in ((k, v) for k, v in a.items() if k not in ignore):
        if k in ("hist_edges", "threshold") or k.endswith(("/n", "/n_images", "/n_class", "/pregate_n")):
            assert torch.equal(b[k], v), k
        elif v.is_floating_point():
            torch.testing.assert_close(b[k], v, rtol=1e-5, atol=1e-5 * float(v.abs().max()), msg=k)
        elif v.dim() == 0:
            assert torch.equal(b[k], v), k
        else:
            assert b[k].dtype == v.dtype and float((b[k] - v).abs().sum()) <= 5e-3 * max(1, float(v.abs().sum())), k


def test_capture_with_a_wholly_unreadable_shard_equals_one_process(tmp_path, checkpoint):
    """Rank 1's shard (odd sample positions: images 1 and 3 of each class) is unreadable: it contributes zeros."""
    data = tmp_path / "data"
    for c, name in enumerate(["ant", "bee", "moth"]):
        write_images(data / "train" / name, 4, seed=c, size=32)
        write_images(data / "val" / name, 1, seed=100 + c, size=32)
        for i in (1, 3):
            _spoil(data / "train" / name / f"{i:03d}.png")
    args = [
        f"--DATA_DIR={data}",
        f"--CHECKPOINT={checkpoint}",
        *COMMON,
        *EXACT,
        "--BATCH_SIZE=2",
        "--SAMPLES_PER_CLASS=4",
    ]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    single(f"--RUN_DIR={one}", *args)
    torchrun(2, "visualize_neuron_activations.py", f"--RUN_DIR={two}", *args)
    a, b = (torch.load(os.path.join(d, "activation_stats.pt"), weights_only=True) for d in (one, two))
    _same_stats(a, b, ignore=("n_batches",))  # 6 batches of 2 (one readable each) in one process, 3 on rank 0
    ja, jb = (json.load(open(os.path.join(d, "activation_stats.json"))) for d in (one, two))
    assert ja["skipped_images"] == jb["skipped_images"] and ja["skipped_images"]["count"] == 6


def test_ddp_with_unreadable_batches_equals_one_process(tmp_path):
    """Step 1: rank 1's whole batch is unreadable (it substitutes a zero-weight batch); step 2: the ranks have
    3 and 4 images. Two processes at batch 4 still take the steps of one process at batch 8: no deadlock, each
    step the mean over its readable images."""
    from torch.utils.data import DistributedSampler

    data = tmp_path / "data"
    names = ["ant", "bee", "moth"]
    for c, name in enumerate(names):
        write_images(data / "train" / name, 11, seed=c, size=32)
        write_images(data / "val" / name, 2, seed=100 + c, size=32)
    parts = []
    for r in range(2):  # the training loader's sampler (SEED=0, first epoch is 1): which image each rank reads
        sampler = DistributedSampler(range(33), 2, r, shuffle=True, seed=0, drop_last=True)
        sampler.set_epoch(1)
        parts.append(list(sampler))
    for index in parts[1][:4] + parts[0][4:5]:
        _spoil(data / "train" / names[index // 11] / f"{index % 11:03d}.png")
    args = [
        f"--DATA_DIR={data}",
        *COMMON,
        "--EPOCHS=1",
        "--BN_BATCHES=1",
        "--FREEZE_BN=True",
        "--AUGMENT=False",
        "--DROPOUT=0.0",
    ]
    torchrun(1, "train_model.py", f"--RUN_DIR={tmp_path / 'one'}", "--BATCH_SIZE=8", *args)
    torchrun(2, "train_model.py", f"--RUN_DIR={tmp_path / 'two'}", "--BATCH_SIZE=4", *args)
    (one, _), (two, _) = (models.load_checkpoint(str(tmp_path / d / "baseline.pt")) for d in ("one", "two"))
    p1, p2 = ({k: p.detach() for k, p in m.named_parameters()} for m in (one, two))
    for k in p1:
        torch.testing.assert_close(p2[k], p1[k], rtol=1e-4, atol=1e-5, msg=k)


def test_a_step_without_images_on_any_rank_is_skipped_alone(monkeypatch):
    """One process: a wholly unreadable batch is no step (and no substitute)."""
    from mbv3prune import train

    model = randomized_model(ARCH)
    loss, own = train._step_loss(
        model,
        torch.empty(0),
        torch.empty(0, dtype=torch.long),
        torch.nn.CrossEntropyLoss(reduction="sum"),
        torch.device("cpu"),
        torch.autocast("cpu", enabled=False),
    )
    assert loss is None and own is None
