"""Small reliability fixes: common constants everywhere, skipped files named once, a depthwise check that can
fail, and the pruning API's floor."""

import os
import runpy

import pytest
from torch import nn

from mbv3prune import models
from mbv3prune.blocks import find_blocks
from mbv3prune.data import Skipped
from mbv3prune.errors import PruneError
from mbv3prune.prune import prune_blocks
from tests.helpers import ROOT, run_stage

ARCH = "mobilenet_v3_small"


def test_every_stage_accepts_the_common_constants_and_still_refuses_unknown_ones(tmp_path):
    models.save_checkpoint(tmp_path / "baseline.pt", models.build_model(ARCH, 3), ARCH, list("abc"))
    common = [
        f"--RUN_DIR={tmp_path}",
        f"--MODEL_ARCH={ARCH}",
        f"--DATA_DIR={tmp_path}/data",
        "--IMAGE_SIZE=32",
        "--BATCH_SIZE=4",
        "--NUM_WORKERS=0",
        "--DEVICE=cpu",
        "--SEED=1",
    ]
    code, out, err = run_stage("mobilenetv3_features.py", *common)
    assert code == 0, err[-800:]
    code, _, err = run_stage("mobilenetv3_features.py", *common, "--DATA_DIRS=x")
    assert code == 2 and "unknown constant --DATA_DIRS" in err


def test_skipped_names_each_file_once():
    skipped = Skipped()
    for paths in (["a.jpg"], ["a.jpg", "b.jpg"], ["a.jpg"], ["b.jpg", "b.jpg"]):  # every epoch, BN pass, val
        skipped.add(paths)
    assert skipped.count == 2 and skipped.paths == ["a.jpg", "b.jpg"]
    assert skipped.summary() == "2 unreadable image(s) skipped, e.g. a.jpg, b.jpg"


def test_depthwise_check_fails_on_a_conv_that_is_no_longer_depthwise():
    checks = runpy.run_path(os.path.join(ROOT, "validate_model_structure.py"), run_name="checks")["structure_checks"]
    model = models.build_model(ARCH, 3)
    assert all(c["ok"] for c in checks(model, 3))
    dw = model.get_submodule("features.2.block.1.0")
    model.features[2].block[1][0] = nn.Conv2d(
        dw.in_channels, dw.out_channels, dw.kernel_size, dw.stride, dw.padding, groups=1, bias=False
    )
    failed = {c["check"]: c["detail"] for c in checks(model, 3) if not c["ok"]}
    assert (
        "depthwise_in_out_groups" in failed
        and "features.2.block.1.0: in 72 out 72 groups 1" in failed["depthwise_in_out_groups"]
    )


def test_pruning_api_refuses_to_leave_a_block_under_its_floor():
    model = models.build_model(ARCH, 3)
    blocks = find_blocks(model)
    name = next(b for b, r in blocks.items() if "expand" in r)
    hidden = blocks[name]["hidden_channels"]
    with pytest.raises(
        PruneError,
        match=rf"block {name}: removing {hidden - 2} of {hidden} channels would leave 2, "
        "under its floor of 8",
    ):
        prune_blocks(model, blocks, {name: list(range(hidden - 2))}, image_size=32)
    record = prune_blocks(model, blocks, {name: list(range(hidden - 8))}, image_size=32)
    assert record[name]["after"] == 8


def test_the_plan_stage_refuses_obs_without_second_moments_before_capturing(tmp_path):
    code, _, err = run_stage("visualize_channel_activation.py", f"--RUN_DIR={tmp_path}", "--SECOND_MOMENTS=False")
    assert code == 2 and "covariances: set SECOND_MOMENTS=True" in err and "Traceback" not in err
    assert os.listdir(tmp_path) == []  # refused before anything was read or written


def test_bn_recalibrate_reads_the_words_true_and_false_as_booleans():
    from mbv3prune.experiment import check_bn_recalibrate

    assert check_bn_recalibrate("False") is False and check_bn_recalibrate("True") is True  # as typed on the CLI
    assert check_bn_recalibrate("auto") == "auto" and check_bn_recalibrate(False) is False
    with pytest.raises(PruneError, match="BN_RECALIBRATE='no'"):
        check_bn_recalibrate("no")
