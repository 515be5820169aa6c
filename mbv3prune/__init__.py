"""Activation-based structured pruning of torchvision MobileNetV3: the shared code of the stage scripts.

In a notebook:  ``from mbv3prune.models import load_model; model = load_model("runs/demo/pruned.pt")``
"""
