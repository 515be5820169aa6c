"""One run, loaded once: the model, its blocks, the plan and statistics, the data, the loaders and the MACs.

The pruning stage and the accuracy benchmarks load a run through ``load_run``, so they see the same model,
the same checks (statistics measured on this checkpoint, a plan made for these widths) and the same data.
"""

import os
import warnings
from types import SimpleNamespace

from . import distributed, measure, models, stage
from .artifacts import read_json, sha256_file
from .blocks import find_blocks
from .capture import describe_layers
from .config import path_or_default
from .data import eval_split
from .errors import PruneError
from .plan import check_plan_matches_model, load_plan
from .prune import count_macs_params, macs_per_channel


def make_loaders(cfg, splits):
    """Loaders: ``eval`` (test, else val), ``val``, ``bn`` (un-augmented train batches), ``train`` (augmented;
    under torchrun each process's own part)."""
    return {
        "eval": stage.loader(cfg, splits[eval_split(splits)]),
        "val": stage.loader(cfg, splits["val"]),
        "bn": stage.loader(cfg, splits["train"], shuffle=True),
        "train": stage.loader(cfg, splits["train"], train=True, shuffle=True),
    }


def load_structure(path, model):
    """The block structure file, checked against the model it is applied to."""
    structure = read_json(path, "block structure")
    blocks = structure.get("blocks") if isinstance(structure, dict) else None
    if not isinstance(blocks, dict):
        raise PruneError(f"block structure {path} has no 'blocks' object: re-run mobilenetv3_features.py")
    actual = find_blocks(model)
    for name in list(actual) + [b for b in blocks if b not in actual]:
        if blocks.get(name) != actual.get(name):
            raise PruneError(
                f"block structure {path} describes another model: block {name} differs "
                "(re-run mobilenetv3_features.py on this checkpoint)"
            )
    return actual


def _load_plan(run, cfg, widths):
    run.plan_path = path_or_default(cfg, "PLAN", "pruning_plan_default.json")
    run.plan = load_plan(run.plan_path, run.blocks, widths)
    warning = check_plan_matches_model(run.plan, run.meta["arch"], widths, sha256_file(run.checkpoint))
    if warning:
        warnings.warn(warning, stacklevel=2)


def _load_stats(run, cfg):
    path = (
        path_or_default(cfg, "STATS", measure.STATS_PT)
        if "STATS" in cfg
        else os.path.join(cfg["RUN_DIR"], measure.STATS_PT)
    )
    run.stats, run.stats_meta = measure.load_checked(path, run.checkpoint)
    run.stats_path = path
    size = run.stats_meta["identity"].get("image_size")
    if size != cfg["IMAGE_SIZE"]:
        raise PruneError(
            f"{path} was measured at {size} px, not IMAGE_SIZE={cfg['IMAGE_SIZE']}: "
            "re-run visualize_neuron_activations.py at this IMAGE_SIZE"
        )


def load_run(cfg, *, plan=False, stats=True, structure=False, in_memory=False):
    """A namespace with everything a pruning experiment needs, checked to belong together.

    ``plan``: read and check the plan file (``PLAN`` or RUN_DIR/pruning_plan_default.json); ``stats``: the
    activation statistics (``STATS`` or RUN_DIR/activation_stats.pt), refused when measured on another
    checkpoint or image size; ``structure``: check RUN_DIR/mobilenetv3_block_structure.json against the
    model; ``in_memory``: decode the eval, val and BN images once and keep them (benchmarks re-read them).
    The checkpoint is ``CHECKPOINT`` (when the config has it and sets it) or RUN_DIR/baseline.pt.
    """
    run = SimpleNamespace(device=distributed.setup(cfg["DEVICE"]))
    run.checkpoint = (
        path_or_default(cfg, "CHECKPOINT", "baseline.pt")
        if "CHECKPOINT" in cfg
        else os.path.join(cfg["RUN_DIR"], "baseline.pt")
    )
    run.model, run.meta = models.load_checkpoint(run.checkpoint, cfg["MODEL_ARCH"], cfg.get("ALLOW_PICKLE", False))
    cfg, run.splits, run.class_names = stage.checkpoint_data(cfg, run.meta)  # val: the model's own held-out images
    run.cfg = cfg
    run.blocks = (
        load_structure(os.path.join(cfg["RUN_DIR"], "mobilenetv3_block_structure.json"), run.model)
        if structure
        else find_blocks(run.model)
    )
    widths = models.layer_widths(run.model)
    run.plan, run.plan_path, run.stats, run.stats_meta = None, None, None, None
    if plan:
        _load_plan(run, cfg, widths)
    if stats:
        _load_stats(run, cfg)
    run.capture_point = (
        run.plan["capture_point"] if plan else run.stats_meta["identity"]["capture_point"] if stats else "project_input"
    )
    run.layers = describe_layers(run.blocks, run.capture_point)
    if stats:
        measure.check_sample_in_train(run.stats_meta, run.splits, cfg, run.stats_path)
    models.to_device(run.model, run.device)
    run.loaders = make_loaders(cfg, run.splits)
    if in_memory:
        for name in ("eval", "val", "bn"):
            run.loaders[name] = list(run.loaders[name])
    run.total, run.params = count_macs_params(run.model, cfg["IMAGE_SIZE"])
    run.per_channel = macs_per_channel(run.model, run.blocks, cfg["IMAGE_SIZE"])
    return run
