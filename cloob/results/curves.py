"""The training-curve pictures beside the report: training.png compares the runs, training-<run>.png
shows one (loss, lr, inv_tau, samples/s over step, and zero-shot accuracy per evaluated step).

Only draws a Training (training.py gathers it); matplotlib is imported when drawn, through the Agg
canvas directly, as in figure.py.
"""

from __future__ import annotations

import math

from cloob import methods as _methods
from cloob.results.figure import method_colors, png_bytes
from cloob.results.training import COMPARISON_PNG, Training

_TITLES = {"lr": "learning rate", "inv_tau": "inv_tau (logit scale)", "samples_per_s": "samples/s"}

# A panel: (title, y label, [(label, colour, [(step, value)])]).
Panel = tuple[str, str, list]


def _figure(panels: list[Panel], title: str, legend: list[tuple[str, object]] | None = None) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    ncols = min(3, max(len(panels), 1))
    nrows = max(math.ceil(len(panels) / ncols), 1)
    height = 2.9 * nrows + (1.2 if legend else 0.8)
    fig = Figure(figsize=(4.3 * ncols, height))
    FigureCanvasAgg(fig)
    # Fixed margins (inches), not a layout engine: constrained layout doubled the drawing time.
    fig.subplots_adjust(left=0.75 / (4.3 * ncols), right=1 - 0.15 / (4.3 * ncols), top=1 - 0.8 / height,
                        bottom=(0.95 if legend else 0.5) / height, wspace=0.32, hspace=0.55)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, (name, ylabel, lines) in zip(axes, panels):
        for label, color, pts in lines:
            few = len(pts) <= 20  # a marker per point while they are few (evaluated steps), else a plain line
            ax.plot([s for s, _ in pts], [v for _, v in pts], color=color, label=label, linewidth=1.2,
                    marker="o" if few else None, markersize=4)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if legend is None and len(lines) > 1:
            ax.legend(fontsize=7, frameon=False)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    if not panels:
        axes[0].set_visible(True)
        axes[0].text(0.5, 0.5, "no training metrics", ha="center", va="center", transform=axes[0].transAxes)
    if legend:
        fig.legend([Line2D([], [], color=c, linewidth=2) for _, c in legend], [lab for lab, _ in legend],
                   loc="lower center", bbox_to_anchor=(0.5, 0.01), ncol=min(len(legend), 3), fontsize=8, frameon=False)
    fig.suptitle(title)
    return png_bytes(fig)


def comparison_panels(training: Training) -> list[Panel]:
    """The panels of training.png; the colours follow the runs (one family per method)."""
    runs = training.runs
    colors = dict(zip((r.run_id for r in runs), method_colors([r.method for r in runs])))
    panels: list[Panel] = []
    # CLOOB's loss is ~0.1-0.2 and CLIP's ~1-5: on one axis CLOOB's curve is flat. A panel per method
    # keeps a linear axis for each (a log axis would not do: the InfoLOOB loss can go below zero, as
    # the demo's CLOOB run does after ~400 steps).
    methods = sorted({r.method for r in runs}, key=lambda m: (_methods.order(m), m or ""))
    for m in methods:
        panels.append((f"loss ({(m or '?').upper()})", "loss",
                       [(r.label, colors[r.run_id], r.series["loss"]) for r in runs if r.method == m]))
    for key in ("lr", "inv_tau", "samples_per_s"):
        panels.append((_TITLES[key], key, [(r.label, colors[r.run_id], r.series[key]) for r in runs]))
    datasets = list(dict.fromkeys(d for r in runs for d in r.accuracy))
    for d in datasets:
        panels.append((f"zero-shot {d}", f"{training.metric} (%)",
                       [(r.label, colors[r.run_id], r.accuracy[d]) for r in runs if d in r.accuracy]))
    return panels


def render_comparison_png(training: Training) -> bytes:
    """training.png: every run of the report in each panel (loss: a panel per method)."""
    colors = method_colors([r.method for r in training.runs])
    return _figure(comparison_panels(training), "Training: all runs",
                   legend=[(r.label, c) for r, c in zip(training.runs, colors)])


def render_run_png(training: Training, run_id: str) -> bytes:
    """training-<run>.png: one run's curves, its accuracy one line per dataset."""
    from matplotlib import colormaps

    run = next(r for r in training.runs if r.run_id == run_id)
    [color] = method_colors([run.method])
    panels: list[Panel] = [("loss", "loss", [("loss", color, run.series["loss"])])]
    panels += [(_TITLES[k], k, [(k, color, run.series[k])]) for k in ("lr", "inv_tau", "samples_per_s")]
    if run.accuracy:
        tab = colormaps["tab10"]
        panels.append(("zero-shot accuracy", f"{training.metric} (%)",
                       [(d, tab(i % 10), pts) for i, (d, pts) in enumerate(run.accuracy.items())]))
    return _figure(panels, f"Training: {run.label}")


def render_all(training: Training) -> dict[str, bytes]:
    """File name -> PNG: training.png and training-<run>.png per run (nothing when there are no runs)."""
    if not training.runs:
        return {}
    return {COMPARISON_PNG: render_comparison_png(training),
            **{r.png: render_run_png(training, r.run_id) for r in training.runs}}
