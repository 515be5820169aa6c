"""Every figure of the project, one function each (matplotlib without a display, written atomically)."""

import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from .artifacts import save_figure  # noqa: E402


def magnitude_histogram(counts, edges, title, threshold, suggested, path):
    """Distribution of |a| over log-spaced bins (exact zeros and overflow annotated), threshold marked."""
    counts, edges = np.asarray(counts, dtype=np.float64), np.asarray(edges, dtype=np.float64)
    total = max(counts.sum(), 1.0)
    lo, hi = edges[2:-2], edges[3:-1]  # the regular bins
    fig, ax = plt.subplots(figsize=(7, 3.6))
    ax.bar(lo, counts[2:-1] / total, width=hi - lo, align="edge", color="#4c72b0", edgecolor="none")
    ax.set_xscale("log")
    ax.set_xlim(max(lo[counts[2:-1] > 0].min() / 2, 1e-6) if (counts[2:-1] > 0).any() else 1e-6, hi[-1])
    ax.axvline(threshold, color="#c44e52", lw=1.5, label=f"THRESHOLD {threshold:.3g}")
    for i, (name, value) in enumerate(sorted(suggested.items())):
        ax.axvline(value, color=f"C{i + 2}", lw=1, ls="--", label=f"{name} {value:.3g}")
    ax.set_xlabel("|activation| (log scale)")
    ax.set_ylabel("fraction of activations")
    ax.set_title(title, fontsize=9)
    ax.text(
        0.01,
        0.97,
        f"exact zeros: {100 * counts[0] / total:.1f}%\nbelow 1e-6: {100 * counts[1] / total:.1f}%",
        transform=ax.transAxes,
        va="top",
        fontsize=8,
    )
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    return save_figure(fig, path)


def threshold_sensitivity(thresholds, curves, current, deadness_threshold, path):
    """Left: fraction of activations below t; right: fraction of channels with deadness > DEADNESS_THRESHOLD."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharex=True)
    cmap = plt.get_cmap("viridis")
    for i, (layer, (below, channels)) in enumerate(curves.items()):
        colour = cmap(i / max(1, len(curves) - 1))
        axes[0].plot(thresholds, below, color=colour, lw=1, label=layer)
        axes[1].plot(thresholds, channels, color=colour, lw=1)
    for ax in axes:
        ax.set_xscale("log")
        ax.axvline(current, color="#c44e52", lw=1.2)
        ax.set_xlabel("THRESHOLD on |activation|")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("fraction of activations below THRESHOLD")
    axes[1].set_ylabel(f"fraction of channels with deadness > {deadness_threshold}")
    axes[0].legend(fontsize=6, ncol=2)
    fig.suptitle("Threshold sensitivity, one curve per layer (red: current THRESHOLD)", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def tile(maps, pad=1):
    """[C, H, W] maps as one 2-D mosaic (NaN padding), as square as possible."""
    c, h, w = maps.shape
    cols = math.ceil(math.sqrt(c * h / w))
    rows = math.ceil(c / cols)
    mosaic = np.full((rows * (h + pad) - pad, cols * (w + pad) - pad), np.nan)
    for i in range(c):
        r, q = divmod(i, cols)
        mosaic[r * (h + pad) : r * (h + pad) + h, q * (w + pad) : q * (w + pad) + w] = maps[i]
    return mosaic, cols


def deadness_grid(fraction, title, path):
    """One small heatmap per channel over H x W (brighter = more often inactive), drawn as one tiled image."""
    mosaic, cols = tile(np.asarray(fraction, dtype=np.float64))
    fig, ax = plt.subplots(figsize=(8, 8 * mosaic.shape[0] / mosaic.shape[1] + 0.8))
    im = ax.imshow(mosaic, cmap="magma", vmin=0, vmax=1, interpolation="nearest")
    ax.set_title(
        f"{title}\n{fraction.shape[0]} channels, {cols} per row, each {fraction.shape[1]}x{fraction.shape[2]}",
        fontsize=9,
    )
    ax.axis("off")
    fig.colorbar(im, ax=ax, fraction=0.03, label="fraction of images with |a| < THRESHOLD")
    fig.tight_layout()
    return save_figure(fig, path)


def deadness_histogram(per_layer, deadness_threshold, path):
    """Histogram of channel deadness over all layers, one stacked colour per layer."""
    fig, ax = plt.subplots(figsize=(8, 4))
    values = [np.asarray(v, dtype=np.float64) for v in per_layer.values()]
    ax.hist(
        values,
        bins=np.linspace(0, 1, 41),
        stacked=True,
        label=list(per_layer),
        color=plt.get_cmap("viridis")(np.linspace(0, 1, len(values))),
    )
    ax.axvline(deadness_threshold, color="#c44e52", lw=1.5, label=f"DEADNESS_THRESHOLD {deadness_threshold}")
    ax.set_xlabel("channel deadness (fraction of activations below THRESHOLD)")
    ax.set_ylabel("channels")
    ax.set_yscale("log")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    return save_figure(fig, path)


def heat_overlay(ax, image, heat, title):
    """An image with a [h, w] heat map upsampled onto it."""
    heat = torch.as_tensor(heat, dtype=torch.float32)[None, None]
    heat = torch.nn.functional.interpolate(heat, size=image.shape[:2], mode="bilinear", align_corners=False)[0, 0]
    heat = (heat - heat.min()) / (heat.max() - heat.min() + 1e-12)
    ax.imshow(image)
    ax.imshow(heat.numpy(), cmap="jet", alpha=0.45)
    ax.set_title(title, fontsize=7)
    ax.axis("off")


def single_overlay(image, heat, title, path):
    fig, ax = plt.subplots(figsize=(3.2, 3.4))
    heat_overlay(ax, image, heat, title)
    fig.tight_layout()
    return save_figure(fig, path)


def before_after_panel(image, rows, layers, path):
    """Rows = models ({label, prediction, heats per layer}), columns = the image and one overlay per layer."""
    fig, axes = plt.subplots(
        len(rows), len(layers) + 1, figsize=(2.3 * (len(layers) + 1), 2.5 * len(rows)), squeeze=False
    )
    for r, row in enumerate(rows):
        axes[r, 0].imshow(image)
        axes[r, 0].set_title(f"{row['label']}\n{row['prediction']}", fontsize=7)
        axes[r, 0].axis("off")
        for c, layer in enumerate(layers):
            heat = row["heats"][layer]
            heat_overlay(axes[r, c + 1], image, heat["map"], f"{layer}\n{heat['desc']}")
    fig.tight_layout()
    return save_figure(fig, path)


def sweep(xs, top1, macs_reduction, xlabel, path, baseline_top1=None):
    """Top-1 and MACs reduction against the swept value: the trade-off a user picks from."""
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(xs, top1, "o-", color="#4c72b0", label="top-1 (after BN recalibration)")
    if baseline_top1 is not None:
        ax.axhline(baseline_top1, color="#4c72b0", ls=":", lw=1, label="baseline top-1")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("top-1", color="#4c72b0")
    ax.set_ylim(0, 1)
    ax2 = ax.twinx()
    ax2.plot(xs, macs_reduction, "s--", color="#dd8452", label="MACs reduction")
    ax2.set_ylabel("MACs reduction", color="#dd8452")
    ax2.set_ylim(0, max(0.6, max(macs_reduction, default=0) * 1.1))
    lines = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(lines, [ln.get_label() for ln in lines], fontsize=8, loc="lower left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)


def deadness_rounds(initial, latest, cut, path, score="deadness"):
    """Per block, each channel's score in the first measurement against the last one (did deadness move?).

    ``initial`` / ``latest``: {block: prunability} as the iterative mode keeps them (for mean_abs,
    contribution and fluctuation the negated value); ``cut``: DEADNESS_THRESHOLD for deadness, else THRESHOLD.
    Red: channels that crossed the cut between the first and the last measurement.
    """
    names = list(initial)
    lower = score != "deadness"  # the other scores prune values BELOW the cut
    cols = min(5, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.6 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        x, y = np.asarray(initial[name], dtype=np.float64), np.asarray(latest[name], dtype=np.float64)
        if lower:
            x, y = -x, -y
        moved = ((x < cut) != (y < cut)) if lower else ((x > cut) != (y > cut))
        ax.scatter(x[~moved], y[~moved], s=4, color="#4c72b0", alpha=0.6)
        ax.scatter(x[moved], y[moved], s=8, color="#c44e52", label=f"{int(moved.sum())} crossed")
        ax.axvline(cut, color="grey", lw=0.6, ls=":")
        ax.axhline(cut, color="grey", lw=0.6, ls=":")
        top = (
            max(1.0, float(x.max(initial=0)), float(y.max(initial=0)))
            if not lower
            else max(float(x.max(initial=0)), float(y.max(initial=0)), cut) * 1.05
        )
        ax.plot([0, top], [0, top], color="grey", lw=0.5)
        ax.set_title(name, fontsize=8)
        ax.legend(fontsize=6, loc="upper left")
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    fig.supxlabel(f"{score}, first measurement (cut {cut:g})")
    fig.supylabel(f"{score}, last measurement before pruning")
    fig.tight_layout()
    return save_figure(fig, path)


def criteria_comparison(
    results,
    allocations,
    path,
    steps=(("pruned", "no fine-tuning"), ("bn_recalibrated", "BN recalibrated"), ("finetuned", "fine-tuned")),
):
    """Top-1 against MACs removed: a line per criterion (random: mean of its seeds, min-max band), a panel per
    allocation (rows) and recovery step (columns); 95% bootstrap intervals as error bars."""
    fig, axes = plt.subplots(
        len(allocations), len(steps), figsize=(5 * len(steps), 4 * len(allocations)), squeeze=False, sharey=True
    )
    baseline = results.get("baseline", {}).get("top1")
    names = sorted({n for a in allocations for n in _criteria_curves(results, a)})
    palette = [plt.get_cmap("tab10")(i) for i in range(10)] + ["black", "#8c6d31", "#637939", "#7b4173"]
    colors = {n: palette[i % len(palette)] for i, n in enumerate(names)}
    for row, allocation in zip(axes, allocations):
        curves = _criteria_curves(results, allocation)
        for ax, (step, label) in zip(row, steps):
            for name, points in sorted(curves.items()):
                pts = sorted(((x, r[step]) for x, r in points if step in r), key=lambda p: p[0])
                if not pts:
                    continue
                xs = [100 * x for x, _ in pts]
                ys = [100 * r["top1"] for _, r in pts]
                err = [
                    [100 * (r["top1"] - r["ci95"][0]) for _, r in pts],
                    [100 * (r["ci95"][1] - r["top1"]) for _, r in pts],
                ]
                style = ":" if name == "random" else "--" if name.startswith("tp_") else "-"
                ax.errorbar(
                    xs,
                    ys,
                    yerr=err,
                    fmt="o" + style,
                    ms=3,
                    lw=1.2,
                    capsize=2,
                    color=colors[name],
                    label=name,
                    alpha=0.9,
                )
            if not ax.has_data():
                ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes, color="grey")
            if baseline is not None:
                ax.axhline(100 * baseline, color="grey", ls=":", lw=1, label="baseline")
            ax.set_title(f"{allocation} allocation, {label}", fontsize=9)
            ax.set_xlim(0, max([55.0] + [100 * x + 5 for pts in curves.values() for x, _ in pts]))
            ax.set_xlabel("MACs removed (%)")
            ax.grid(alpha=0.3)
        row[0].set_ylabel("top-1 on test (%)")
    legend = {lab: h for ax in axes.flat for h, lab in zip(*ax.get_legend_handles_labels())}
    handles, labels = list(legend.values()), list(legend)
    fig.legend(handles, labels, loc="lower center", ncol=min(6, max(len(labels), 1)), fontsize=8)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    return save_figure(fig, path)


def _criteria_curves(results, allocation):
    """{criterion: [(MACs removed, result)]}; the random seeds averaged into one 'random' curve."""
    curves, seeds = {}, {}
    for key, r in results.items():
        parts = key.split("/")
        if len(parts) != 3 or parts[0] != allocation:
            continue
        name = parts[2]
        if name.startswith("random_s"):
            seeds.setdefault(parts[1], []).append(r)
        else:
            curves.setdefault(name, []).append((r["macs_reduction"], r))
    for runs in seeds.values():
        mean = {"macs_reduction": float(np.mean([r["macs_reduction"] for r in runs]))}
        for step in {s for r in runs for s, v in r.items() if isinstance(v, dict) and "top1" in v}:
            have = [r[step] for r in runs if step in r]  # fine-tuned: the first seed only
            mean[step] = {
                "top1": float(np.mean([h["top1"] for h in have])),
                "ci95": [min(h["ci95"][0] for h in have), max(h["ci95"][1] for h in have)],
            }
        curves.setdefault("random", []).append((mean["macs_reduction"], mean))
    return curves
