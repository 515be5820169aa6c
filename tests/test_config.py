import os
import platform
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mbv3prune.config import apply_overrides, constant_comments, help_text, parse_value
from mbv3prune.errors import PruneError
from tests.helpers import ROOT, run_script


def namespace():
    return {
        "__file__": __file__,
        "RUN_DIR": "runs/demo",
        "EPOCHS": 3,
        "LR": 0.1,
        "DEBUG": False,
        "SWEEP": [0.5, 0.9],
        "CHECKPOINT": "",
        "OPTIONAL": None,
        "lowercase": 1,
    }


def test_overrides_parse_literals_and_bare_words():
    ns = namespace()
    cfg = apply_overrides(
        ns, ["--EPOCHS=7", "--LR=1", "--DEBUG=True", "--RUN_DIR=runs/x", "--SWEEP=[0.1]", "--OPTIONAL=(1, 2)"]
    )
    assert cfg["EPOCHS"] == 7 and cfg["LR"] == 1.0 and isinstance(cfg["LR"], float)
    assert cfg["DEBUG"] is True and cfg["RUN_DIR"] == "runs/x" and cfg["SWEEP"] == [0.1]
    assert cfg["OPTIONAL"] == (1, 2) and ns["EPOCHS"] == 7
    assert "lowercase" not in cfg


def test_string_constant_takes_numbers_as_text():
    assert apply_overrides(namespace(), ["--RUN_DIR=123"])["RUN_DIR"] == "123"


@pytest.mark.parametrize(
    "arg, fragment",
    [
        ("--NOPE=1", "unknown constant --NOPE"),
        ("--EPOCHS=1.5", "--EPOCHS=1.5: expected a int"),
        ("--EPOCHS=True", "expected a int"),
        ("--DEBUG=1", "expected a bool"),
        ("--SWEEP=0.5", "expected a list"),
        ("EPOCHS=3", "not of the form --NAME=value"),
        ("--EPOCHS", "not of the form"),
    ],
)
def test_bad_overrides_are_refused_naming_valid_names(arg, fragment):
    with pytest.raises(PruneError) as err:
        apply_overrides(namespace(), [arg])
    assert fragment in str(err.value)
    if "unknown" in fragment or "form" in fragment:
        assert "RUN_DIR" in str(err.value) and "EPOCHS" in str(err.value)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=40), st.sampled_from(["RUN_DIR", "EPOCHS", "LR", "DEBUG", "SWEEP", "OPTIONAL", "X"]))
def test_override_parser_raises_only_prune_error(raw, name):
    try:
        apply_overrides(namespace(), [f"--{name}={raw}"])
    except PruneError as err:  # the one error type allowed: any other exception fails the test
        assert f"--{name}" in str(err) or "not of the form" in str(err)


def test_parse_value_float_accepts_int():
    assert parse_value("3", 0.5, "LR") == 3.0


def test_help_lists_every_constant_with_comment():
    text = help_text({"__file__": "train_model.py", "__doc__": "Doc.", "EPOCHS": 16, "LR": 2e-3})
    assert "EPOCHS = 16  # training epochs" in text
    comments = constant_comments("train_model.py")
    assert comments["SEED"].startswith("seeds")


def test_script_help_and_unknown_name():
    ok = run_script("train_model.py", "--help")
    assert ok.returncode == 0 and "EPOCHS = 16" in ok.stdout and "Reads:" in ok.stdout
    bad = run_script("train_model.py", "--EPOCH=3")
    assert bad.returncode == 2
    assert "unknown constant --EPOCH" in bad.stderr and "EPOCHS" in bad.stderr and "Traceback" not in bad.stderr


_WHERE = """
import sys, torch
from mbv3prune import config

def main(cfg):
    block = torch.ones(10 << 20)  # 40 MB: above glibc's largest threshold for a mapping of its own
    for line in open("/proc/self/maps"):
        lo, hi = (int(a, 16) for a in line.split()[0].split("-"))
        if lo <= block.data_ptr() < hi:
            print("heap" if line.rstrip().endswith("[heap]") else "mmap")

mode, sys.argv = sys.argv[1], sys.argv[:1]  # as a script with no arguments
config.run(main, {"__file__": "where"}) if mode == "script" else main({})
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="keep_heap tunes glibc's malloc only")
def test_scripts_take_activation_sized_blocks_from_the_kept_heap():
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "LD_PRELOAD"}

    def where(mode):  # by default glibc maps such a block on its own, unmapped (and faulted in again) when freed
        cmd = [sys.executable, "-c", _WHERE, mode]
        return subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT, env=env).stdout.split()[-1]

    assert where("plain") == "mmap"
    assert where("script") == "heap"
