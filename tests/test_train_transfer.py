"""The transfer recipe of fit / train_model.py: a head-only phase with the backbone frozen, a lower backbone LR."""

import json
import os

import pytest
import torch

from mbv3prune import models
from mbv3prune.data import Skipped
from mbv3prune.train import fit, param_groups, set_backbone_frozen, train_one_epoch
from tests.helpers import randomized_model, run_stage

ARCH = "mobilenet_v3_small"


class Batches(list):
    """A loader as a list of (images, labels, unreadable paths) batches (no sampler: one process)."""

    sampler = None


def tiny_loaders(seed=0, n=8, size=32):
    """Two training batches, one val batch of random images."""
    gen = torch.Generator().manual_seed(seed)

    def batch():
        return torch.randn(n, 3, size, size, generator=gen), torch.randint(0, 3, (n,), generator=gen), []

    train = Batches([batch(), batch()])
    return {"train": train, "bn": train, "val": Batches([batch()])}


def split_state(model):
    """(backbone state, head state): copies of every tensor, buffers (BN running statistics) included."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    return (
        {k: v for k, v in state.items() if not k.startswith("classifier.")},
        {k: v for k, v in state.items() if k.startswith("classifier.")},
    )


def changed(before, after):
    return sorted(k for k in before if not torch.equal(before[k], after[k]))


def test_frozen_epochs_leave_the_backbone_and_its_bn_statistics_unchanged_and_train_the_head():
    torch.manual_seed(0)
    model = randomized_model(ARCH).train()
    backbone, head = split_state(model)
    fit(
        model,
        tiny_loaders(),
        ["a", "b", "c"],
        torch.device("cpu"),
        epochs=2,
        freeze_backbone_epochs=2,
        bn_batches=1,
        log=lambda *_: None,
    )
    backbone_after, head_after = split_state(model)
    assert changed(backbone, backbone_after) == []
    assert changed(head, head_after) == sorted(head)  # both linear layers, weights and biases
    assert all(p.requires_grad for p in model.parameters())  # unfrozen again for whoever trains it next


def test_after_the_frozen_epochs_the_backbone_trains():
    torch.manual_seed(0)
    model = randomized_model(ARCH)
    first = model.features[0][0].weight.detach().clone()
    seen = []  # the first conv's weight as each epoch ends (fit logs before choosing the best epoch)
    _, history = fit(
        model,
        tiny_loaders(),
        ["a", "b", "c"],
        torch.device("cpu"),
        epochs=2,
        freeze_backbone_epochs=1,
        bn_batches=1,
        log=lambda *_: seen.append(model.features[0][0].weight.detach().clone()),
    )
    assert [h.get("backbone_frozen", False) for h in history] == [True, False]
    assert torch.equal(seen[0], first) and not torch.equal(seen[1], first)


def test_scaled_learning_rate_appears_in_the_backbone_groups_only():
    model = models.build_model(ARCH, 3)
    groups = param_groups(model, 0.05, backbone_lr_scale=0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    for g in groups:
        heads = {names[id(p)].startswith("classifier.") for p in g["params"]}
        assert len(heads) == 1 and g["lr_scale"] == (1.0 if heads == {True} else 0.1)
        assert all((p.ndim > 1) == (g["weight_decay"] == 0.05) for p in g["params"])
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    optimizer = torch.optim.SGD(groups, lr=1.0)
    train_one_epoch(
        model, tiny_loaders()["train"][:1], optimizer, 0, 10, 0, 2e-3, 0.0, torch.device("cpu"), Skipped(), "t"
    )
    lrs = {g["lr_scale"]: g["lr"] for g in optimizer.param_groups}
    assert lrs[0.1] == pytest.approx(0.1 * lrs[1.0]) and lrs[1.0] == pytest.approx(2e-3)


def test_unscaled_groups_are_the_two_groups_of_before():
    model = models.build_model(ARCH, 3)
    groups = param_groups(model, 0.05)
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0]
    assert [p for g in groups for p in g["params"]] == [p for p in model.parameters() if p.ndim > 1] + [
        p for p in model.parameters() if p.ndim <= 1
    ]
    set_backbone_frozen(model, True)
    assert {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad} == {"classifier"}


def test_train_model_records_the_recipe_and_starting_checkpoint_and_retrains_when_it_changes(tiny_data, tmp_path):
    from mbv3prune.artifacts import sha256_file

    start = str(tmp_path / "start.pt")
    models.save_checkpoint(start, randomized_model(ARCH), ARCH, ["x", "y"])  # 2 classes: the head is replaced
    args = [
        f"--RUN_DIR={tmp_path / 'run'}",
        f"--MODEL_ARCH={ARCH}",
        f"--DATA_DIR={tiny_data}",
        "--IMAGE_SIZE=32",
        "--NUM_WORKERS=0",
        "--EPOCHS=2",
        "--BN_BATCHES=1",
        f"--CHECKPOINT={start}",
        "--FREEZE_BACKBONE_EPOCHS=1",
        "--BACKBONE_LR_SCALE=0.1",
    ]
    code, out, err = run_stage("train_model.py", *args)
    assert code == 0, err[-2000:]
    _, meta = models.load_checkpoint(str(tmp_path / "run" / "baseline.pt"))
    assert meta["extra"]["init_checkpoint"] == {"path": start, "sha256": sha256_file(start)}
    assert meta["config"]["FREEZE_BACKBONE_EPOCHS"] == 1 and meta["config"]["BACKBONE_LR_SCALE"] == 0.1
    metrics = json.load(open(tmp_path / "run" / "train_metrics.json"))
    assert metrics["provenance"]["inputs"]["init_checkpoint"]["sha256"] == sha256_file(start)
    assert metrics["history"][0]["backbone_frozen"] and "backbone_frozen" not in metrics["history"][1]
    assert "reusing" in run_stage("train_model.py", *args)[1]
    models.save_checkpoint(start, randomized_model(ARCH, seed=1), ARCH, ["x", "y"])  # same path, new weights
    assert "reusing" not in run_stage("train_model.py", *args)[1]


@pytest.mark.parametrize(
    "bad, message", [("--FREEZE_BACKBONE_EPOCHS=3", "must lie in"), ("--BACKBONE_LR_SCALE=-1.0", "must be >= 0")]
)
def test_train_model_refuses_a_bad_recipe(tiny_data, tmp_path, bad, message):
    code, _, err = run_stage(
        "train_model.py", f"--RUN_DIR={tmp_path}", f"--DATA_DIR={tiny_data}", "--EPOCHS=2", "--CHECKPOINT=x.pt", bad
    )
    assert code == 2 and message in err


def test_freezing_a_random_backbone_is_refused(tiny_data, tmp_path):
    code, _, err = run_stage(
        "train_model.py", f"--RUN_DIR={tmp_path}", f"--DATA_DIR={tiny_data}", "--FREEZE_BACKBONE_EPOCHS=1"
    )
    assert code == 2 and "needs a CHECKPOINT" in err and not os.path.exists(tmp_path / "baseline.pt")


@pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available",
)
def test_head_only_phase_under_ddp_two_processes_at_batch_4_equals_one_at_batch_8(tmp_path):
    """DDP over a model whose backbone is frozen averages the head's gradients like one process at twice the batch.

    (One epoch: at e1b9a97 two processes already diverge from one in a second epoch, with or without the recipe.)"""
    from tests.helpers import write_images
    from tests.test_distributed import COMMON, torchrun

    data = tmp_path / "data"
    for c, name in enumerate(["ant", "bee", "moth"]):
        write_images(data / "train" / name, 11, seed=c, size=32)
        write_images(data / "val" / name, 2, seed=100 + c, size=32)
    start = str(tmp_path / "start.pt")
    models.save_checkpoint(start, randomized_model(ARCH), ARCH, ["x", "y"])
    args = [
        f"--DATA_DIR={data}",
        *COMMON,
        "--EPOCHS=1",
        "--BN_BATCHES=1",
        "--FREEZE_BN=True",
        "--AUGMENT=False",
        "--DROPOUT=0.0",
        f"--CHECKPOINT={start}",
        "--FREEZE_BACKBONE_EPOCHS=1",
    ]
    torchrun(1, "train_model.py", f"--RUN_DIR={tmp_path / 'one'}", "--BATCH_SIZE=8", *args)
    torchrun(2, "train_model.py", f"--RUN_DIR={tmp_path / 'two'}", "--BATCH_SIZE=4", *args)
    one, two = (models.load_checkpoint(str(tmp_path / d / "baseline.pt"))[0].state_dict() for d in ("one", "two"))
    initial = models.load_checkpoint(start)[0].state_dict()
    assert all(torch.equal(two[k], initial[k]) for k in initial if not k.startswith("classifier."))
    assert not torch.equal(two["classifier.0.weight"], initial["classifier.0.weight"])
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-5, msg=k)


def test_an_epoch_reads_its_loss_once_not_at_every_step(monkeypatch):
    from tests.helpers import count_host_reads

    model = models.build_model(ARCH, 3)
    optimizer = torch.optim.SGD(param_groups(model, 0.05), lr=0.0)
    gen = torch.Generator().manual_seed(1)
    loader = Batches([(torch.randn(4, 3, 32, 32, generator=gen), torch.tensor([0, 1, 2, 0]), []) for _ in range(6)])
    cpu = torch.device("cpu")
    reads = {}
    for steps in (2, 6):
        reads[steps] = count_host_reads(monkeypatch)
        torch.manual_seed(0)  # the classifier's dropout
        loss, _ = train_one_epoch(model, loader[:steps], optimizer, 0, 10, 0, 0.0, 0.0, cpu, Skipped(), "t")
        monkeypatch.undo()
    assert len(reads[6]) == len(reads[2])  # on a GPU, a read per step would wait for it at every step
    torch.manual_seed(0)  # lr 0: the weights did not move, so the same dropout gives the same losses
    with torch.no_grad():
        losses = [torch.nn.functional.cross_entropy(model(images), labels) for images, labels, _ in loader]
    assert loss == pytest.approx(float(torch.stack(losses).mean()), rel=1e-5)
