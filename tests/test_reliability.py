"""Bad input -> one clear line, exit status 2, nothing written; killed stages leave artifacts intact; reruns are
byte-identical."""

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch

from mbv3prune import models
from mbv3prune.artifacts import atomic_write, write_json
from tests.helpers import ROOT, run_stage

ARCH = "mobilenet_v3_small"


@pytest.fixture(scope="module")
def run(tiny_data, tmp_path_factory):
    """A complete tiny run directory (Small, 32 px): baseline, structure, statistics, plan."""
    run_dir = str(tmp_path_factory.mktemp("reliability_run"))
    args = [
        f"--RUN_DIR={run_dir}",
        f"--MODEL_ARCH={ARCH}",
        f"--DATA_DIR={tiny_data}",
        "--IMAGE_SIZE=32",
        "--NUM_WORKERS=0",
    ]
    for script, extra in (
        ("train_model.py", ["--EPOCHS=1", "--BN_BATCHES=1"]),
        ("visualize_channel_activation.py", ["--GRIDS=False"]),
    ):
        code, _, err = run_stage(script, *args, *extra)
        assert code == 0, err
    code, _, err = run_stage("mobilenetv3_features.py", f"--RUN_DIR={run_dir}", f"--MODEL_ARCH={ARCH}")
    assert code == 0, err
    return run_dir, args


def snapshot(directory):
    return {
        os.path.join(d, f): (os.path.getsize(os.path.join(d, f)), os.path.getmtime(os.path.join(d, f)))
        for d, _, files in os.walk(directory)
        for f in files
    }


def plan_variant(run_dir, tmp_path, mutate):
    plan = json.load(open(os.path.join(run_dir, "pruning_plan_default.json")))
    mutate(plan)
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan))
    return f"--PLAN={path}"


def prunable(plan):
    return next(b for b, e in plan["blocks"].items() if "skipped" not in e)


def set_prune(plan, idxs):
    block = prunable(plan)
    plan["blocks"][block]["prune"] = idxs
    plan["blocks"][block]["kept"] = plan["blocks"][block]["hidden_channels"] - len(idxs)


def nan_checkpoint(run_dir, tmp_path):
    model, meta = models.load_checkpoint(os.path.join(run_dir, "baseline.pt"))
    model.get_submodule("features.2.block.0.1").running_var.fill_(-1.0)
    path = str(tmp_path / "nan.pt")
    models.save_checkpoint(path, model, ARCH, meta["class_names"])
    return f"--CHECKPOINT={path}"


def other_classes_checkpoint(run_dir, tmp_path):
    path = str(tmp_path / "five.pt")
    models.save_checkpoint(path, models.build_model(ARCH, 5), ARCH, list("abcde"))
    return f"--CHECKPOINT={path}"


def junk_file(tmp_path, name="junk.pt", content=b"not a checkpoint"):
    (tmp_path / name).write_bytes(content)
    return str(tmp_path / name)


P = "experiment_activation_based_block_pruning.py"
CASES = [  # (script, extra args (callable of run_dir, tmp_path) or list, fragment the message must contain)
    ("train_model.py", lambda r, t: ["--DATA_DIR=/nonexistent/data"], "DATA_DIR /nonexistent/data does not exist"),
    ("train_model.py", lambda r, t: [f"--DATA_DIR={t}"], "is not a data set"),
    ("train_model.py", lambda r, t: ["--MODEL_ARCH=resnet50", "--REUSE=False"], "unknown MODEL_ARCH 'resnet50'"),
    ("mobilenetv3_features.py", lambda r, t: [f"--CHECKPOINT={t}/missing.pt"], "missing.pt does not exist"),
    ("mobilenetv3_features.py", lambda r, t: [f"--CHECKPOINT={junk_file(t)}"], "junk.pt cannot be read"),
    (
        "visualize_neuron_activations.py",
        lambda r, t: ["--CAPTURE_POINT=somewhere"],
        "unknown CAPTURE_POINT 'somewhere'",
    ),
    ("visualize_neuron_activations.py", lambda r, t: ["--THRESHOLD=-1.0"], "THRESHOLD=-1.0"),
    ("visualize_neuron_activations.py", lambda r, t: [nan_checkpoint(r, t), "--RECAPTURE=True"], "features.2.block"),
    ("visualize_neuron_activations.py", lambda r, t: [other_classes_checkpoint(r, t)], "has 5 classes but DATA_DIR"),
    ("visualize_channel_activation.py", lambda r, t: ["--SCORE=loudness"], "unknown SCORE 'loudness'"),
    ("visualize_channel_activation.py", lambda r, t: ["--DEADNESS_THRESHOLD=2.0"], "DEADNESS_THRESHOLD=2.0"),
    ("visualize_channel_activation.py", lambda r, t: ["--SKIP_BLOCKS=['features.99']"], "features.99"),
    (P, lambda r, t: ["--PRUNE_MODE=random"], "unknown PRUNE_MODE 'random'"),
    (P, lambda r, t: ["--TARGET_MACS_REDUCTION=1.5"], "TARGET_MACS_REDUCTION=1.5"),
    (P, lambda r, t: [f"--PLAN={junk_file(t, 'plan.json', b'{not json')}"], "not readable JSON"),
    (P, lambda r, t: [plan_variant(r, t, lambda p: set_prune(p, [0, 0]))], "prune"),
    (P, lambda r, t: [plan_variant(r, t, lambda p: set_prune(p, [-1]))], "prune"),
    (P, lambda r, t: [plan_variant(r, t, lambda p: set_prune(p, [10**6]))], "prune"),
    (P, lambda r, t: [plan_variant(r, t, lambda p: set_prune(p, ["3"]))], "prune"),
    (
        P,
        lambda r, t: [
            plan_variant(r, t, lambda p: set_prune(p, list(range(p["blocks"][prunable(p)]["hidden_channels"] - 2))))
        ],
        "floor",
    ),
    (
        P,
        lambda r, t: [plan_variant(r, t, lambda p: p["blocks"].__setitem__("features.42", p["blocks"][prunable(p)]))],
        "features.42",
    ),
    (
        P,
        lambda r, t: [plan_variant(r, t, lambda p: p["model"].__setitem__("arch", "mobilenet_v3_large"))],
        "mobilenet_v3_large",
    ),
    (P, lambda r, t: [plan_variant(r, t, lambda p: p.pop("blocks"))], "blocks"),
    (
        "validate_model_structure.py",
        lambda r, t: ["--EXPORT=tflite", f"--CHECKPOINT={r}/baseline.pt"],
        "unknown EXPORT",
    ),
    (
        "visualize_activation_overlay_image.py",
        lambda r, t: ["--LAYERS=['features.99']", "--PRUNED=none"],
        "features.99",
    ),
]


@pytest.mark.parametrize(
    "script, extra, fragment", CASES, ids=[f"{c[0].split('_')[0]}-{i}" for i, c in enumerate(CASES)]
)
def test_bad_input_one_line_error_nothing_written(run, tmp_path, script, extra, fragment):
    run_dir, args = run
    own = [
        a
        for a in args
        if not (
            script == "mobilenetv3_features.py" and a.split("=")[0] in ("--DATA_DIR", "--IMAGE_SIZE", "--NUM_WORKERS")
        )
    ]
    if script == "visualize_activation_overlay_image.py":
        own = [a for a in own if not a.startswith("--NUM_WORKERS")]
    before = snapshot(run_dir)
    code, out, err = run_stage(script, *own, *extra(run_dir, tmp_path))
    assert code == 2, f"exit {code}: {err[-500:]}"
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and fragment in lines[0], err[-800:]
    assert "Traceback" not in err
    assert snapshot(run_dir) == before


def test_debug_shows_the_traceback(run):
    run_dir, args = run
    code, _, err = run_stage(P, *args, "--PRUNE_MODE=random", "--DEBUG=True")
    assert code == 2 and "Traceback" in err and "unknown PRUNE_MODE" in err


def subprocess_stage(script, *args, patch=None, tmp_path=None):
    """Run a stage in a subprocess; ``patch`` (Python source) first changes the library in that process only
    (through a wrapper script written to ``tmp_path``): how a test kills a stage at a chosen moment."""
    target = os.path.join(ROOT, script)
    if patch:
        wrapper = os.path.join(tmp_path, "patched_stage.py")
        with open(wrapper, "w") as f:
            f.write(
                f"import os, runpy, sys\n{patch}\nsys.argv[0] = {target!r}\n"
                f"runpy.run_path({target!r}, run_name='__main__')\n"
            )
        target = wrapper
    return subprocess.run(
        [sys.executable, target, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": ROOT},
    )


KILL_AFTER_TWO_PARTIAL_SAVES = """
import mbv3prune.measure as measure, mbv3prune.partial as partial
_save, _saves = partial.save_tensors, []
def save_tensors(path, tensors):
    _save(path, tensors)
    if path.endswith(measure.PARTIAL):
        _saves.append(path)
        if len(_saves) == 2:
            os._exit(17)
partial.save_tensors = save_tensors
"""

KILL_BEFORE_RENAMING_THE_REPORT = """
_replace = os.replace
def replace(src, dst):
    if os.path.basename(dst) == "pruning_report.json":
        os._exit(17)
    _replace(src, dst)
os.replace = replace
"""


def test_killed_capture_resumes_to_the_uninterrupted_result(run, tmp_path):
    run_dir, args = run
    work = str(tmp_path / "run")
    shutil.copytree(run_dir, work)
    args = [a.replace(run_dir, work) for a in args] + [
        "--BATCH_SIZE=4",
        "--COV_POSITIONS_PER_IMAGE=0",
        "--HIST_POSITIONS_PER_IMAGE=0",
        "--SAVE_EVERY=1",
        "--RECAPTURE=True",
    ]
    stats_before = open(os.path.join(work, "activation_stats.pt"), "rb").read()
    killed = subprocess_stage(
        "visualize_neuron_activations.py", *args, patch=KILL_AFTER_TWO_PARTIAL_SAVES, tmp_path=tmp_path
    )
    assert killed.returncode == 17
    assert open(os.path.join(work, "activation_stats.pt"), "rb").read() == stats_before  # the old one, intact
    partial = torch.load(os.path.join(work, "activation_stats.partial.pt"), weights_only=True)
    assert int(partial["n_batches"]) == 2
    resumed = subprocess_stage("visualize_neuron_activations.py", *args[:-1], "--RESUME=True")
    assert resumed.returncode == 0, resumed.stderr[-800:]
    assert "resuming the capture after 2 batches" in resumed.stdout
    got = torch.load(os.path.join(work, "activation_stats.pt"), weights_only=True)
    whole = subprocess_stage("visualize_neuron_activations.py", *args)
    assert whole.returncode == 0, whole.stderr[-800:]
    want = torch.load(os.path.join(work, "activation_stats.pt"), weights_only=True)
    assert set(got) == set(want)
    for key in want:
        if want[key].dtype.is_floating_point:
            assert torch.allclose(got[key], want[key], rtol=1e-6, atol=1e-9), key
        else:
            assert torch.equal(got[key], want[key]), key
    assert not os.path.exists(os.path.join(work, "activation_stats.partial.pt"))


def test_killed_before_rename_leaves_the_previous_report(run, tmp_path):
    run_dir, args = run
    work = str(tmp_path / "run")
    shutil.copytree(run_dir, work)
    args = [a.replace(run_dir, work) for a in args] + ["--PRUNE_MODE=target_macs", "--LATENCY=False"]
    first = subprocess_stage(P, *args)
    assert first.returncode == 0, first.stderr[-800:]
    report = open(os.path.join(work, "pruning_report.json"), "rb").read()
    killed = subprocess_stage(
        P, *args, "--TARGET_MACS_REDUCTION=0.4", patch=KILL_BEFORE_RENAMING_THE_REPORT, tmp_path=tmp_path
    )
    assert killed.returncode == 17, killed.stderr[-800:]
    assert [f for f in os.listdir(work) if f.startswith(".pruning_report.json.") and f.endswith(".tmp")]
    assert open(os.path.join(work, "pruning_report.json"), "rb").read() == report
    models.load_checkpoint(os.path.join(work, "pruned.pt"))  # replaced whole, still readable
    again = subprocess_stage(P, *args)
    assert again.returncode == 0 and open(os.path.join(work, "pruning_report.json"), "rb").read() == report
    assert not [f for f in os.listdir(work) if f.endswith(".tmp")]  # the killed writer's leftover is gone


def test_atomic_write_fsyncs_and_leaves_a_live_writers_temp_file(tmp_path, monkeypatch):
    """Two runs in one RUN_DIR: a write removes its own temporary file and a killed writer's, never a live one's."""
    target = tmp_path / "report.json"
    live = tmp_path / f".report.json.{socket.gethostname()}.{os.getppid()}.abc.tmp"  # a running process's
    live.write_text("half written by another run")
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = tmp_path / f".report.json.{socket.gethostname()}.{int(gone.stdout)}.xyz.tmp"
    dead.write_text("left by a killed run")
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd)))
    write_json(target, {"a": 1})
    assert json.load(open(target)) == {"a": 1}
    assert live.exists() and not dead.exists()
    assert any(os.path.basename(p).startswith(".report.json.") for p in synced)  # the data, before the rename
    with pytest.raises(ZeroDivisionError):
        atomic_write(target, lambda tmp: 1 / 0)
    assert live.exists() and sorted(os.listdir(tmp_path)) == sorted([live.name, "report.json"])


def test_same_seed_same_bytes(tiny_data, tmp_path):
    """Two runs of the pipeline (Small, 32 px, two classes, one epoch) give byte-identical artifacts."""
    data = tmp_path / "data"
    for split in ("train", "val"):
        for name in ("ant", "bee"):
            shutil.copytree(os.path.join(tiny_data, split, name), data / split / name)
    run_dir = str(tmp_path / "run")
    args = [f"--RUN_DIR={run_dir}", f"--MODEL_ARCH={ARCH}", f"--DATA_DIR={data}", "--IMAGE_SIZE=32", "--NUM_WORKERS=0"]
    outputs = []
    for _ in range(2):
        shutil.rmtree(run_dir, ignore_errors=True)
        for script, extra in (
            ("train_model.py", ["--EPOCHS=1", "--BN_BATCHES=1"]),
            ("mobilenetv3_features.py", None),
            ("visualize_channel_activation.py", ["--GRIDS=False"]),
            (P, ["--PRUNE_MODE=target_macs", "--LATENCY=False", "--FINETUNE_EPOCHS=1"]),
        ):
            own = args if extra is not None else args[:2]
            code, _, err = run_stage(script, *own, *(extra or []))
            assert code == 0, err[-800:]
        outputs.append(
            {
                f: open(os.path.join(run_dir, f), "rb").read()
                for f in sorted(os.listdir(run_dir))
                if f.endswith((".json", ".pt")) and f != "timings.json"
            }
        )
    assert outputs[0].keys() == outputs[1].keys() and "pruning_report.json" in outputs[0]
    for name in outputs[0]:
        assert outputs[0][name] == outputs[1][name], name
