"""Property: any valid plan (random indices within the floors) prunes Large and Small into a model that passes
validate_model_structure.py's structure checks and still runs."""

import copy
import functools
import os
import runpy

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mbv3prune import models
from mbv3prune.blocks import find_blocks
from mbv3prune.plan import min_kept
from mbv3prune.prune import prune_blocks
from tests.helpers import ROOT


@functools.cache
def base(arch):
    return models.build_model(arch, 4).eval()


@functools.cache
def structure_checks():
    return runpy.run_path(os.path.join(ROOT, "validate_model_structure.py"), run_name="checks")["structure_checks"]


@st.composite
def plans(draw):
    arch = draw(st.sampled_from(models.ARCHS))
    blocks = find_blocks(base(arch))
    plan = {}
    for name, roles in blocks.items():
        if "expand" not in roles or not draw(st.booleans()):
            continue
        hidden = roles["hidden_channels"]
        count = draw(st.integers(0, hidden - min_kept(hidden)))
        plan[name] = draw(st.lists(st.integers(0, hidden - 1), min_size=count, max_size=count, unique=True))
    return arch, plan


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plans())
def test_any_valid_plan_prunes_into_a_valid_model(case):
    arch, plan = case
    model = copy.deepcopy(base(arch))
    record = prune_blocks(model, find_blocks(model), plan, image_size=32)
    failed = [c for c in structure_checks()(model, 4) if not c["ok"]]
    assert not failed, failed
    for name, idxs in plan.items():
        assert (
            find_blocks(model)[name]["hidden_channels"] == record[name]["after"] == record[name]["before"] - len(idxs)
        )
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 4) and torch.isfinite(out).all()
