"""A study's report: study.md (per dataset, each group's mean +- std over seeds at the last step, the
paper's numbers beside them, CLOOB against CLIP by Welch's t-test, p < 0.05 in bold as in the paper),
study.png (zero-shot accuracy against step, mean with a +-std band), diagnostics.png (the blog's
figures: the relative change of the number of effective eigenvalues against the first evaluated step,
with and without Hopfield retrieval; the Ajne uniformity statistic over training, InfoLOOB against
InfoNCE; image and text embeddings), and study.json with every number drawn or printed.
"""

from __future__ import annotations

import json
from collections import defaultdict

from cloob.methods import METHODS
from cloob.study.cells import group_label, method_settings
from cloob.study.stats import ALPHA, TEST_NAME
from cloob.study.summary import StudySummary, rank_settings, relative_eigenvalue_change

FILES = ("study.md", "study.png", "diagnostics.png", "study.json")


def paper_numbers(data: str, arch: str | None, epochs: int | None) -> dict[tuple[str, str], tuple[float, float | None]]:
    """(dataset, method) -> (top-1 %, std %) the paper published for this pretraining data, encoder and
    epochs; empty when it published none (the demo)."""
    from cloob.results.paper import paper_values, setting_for

    choice = setting_for(data, arch, epochs)
    if choice is None:
        return {}
    values, _ = paper_values(choice)
    return {(d, m): (ref.value, ref.std) for m, by_set in values.items() for d, ref in by_set.items()}


def group_order(group: tuple) -> tuple:
    """Methods in their usual order, then architecture, then swept values as numbers where they are
    (inv_tau 10, 20, 100, not 10, 100, 20)."""
    method, arch, point = group
    return (list(METHODS).index(method), str(arch),
            tuple((k, (0, float(v), "") if isinstance(v, (int, float)) else (1, 0.0, str(v))) for k, v in point))


def _fmt(mean: float, std: float | None) -> str:
    return f"{100 * mean:.2f}" + (f" ± {100 * std:.2f}" if std is not None else "")


def render_markdown(name: str, s: StudySummary, paper: dict, seeds: int, settings: dict[str, list[str]] | None = None) -> str:
    """settings: each method's own recipe overrides (cloob.study.cells.method_settings), said under the title."""
    out = [f"# Study {name}", "", f"Zero-shot accuracy (%, each set's main metric) at each run's last step: mean ± "
           f"standard deviation over seeds. CLOOB against CLIP: {TEST_NAME}; **bold**: p < {ALPHA}."]
    if settings:
        out += ["", "Each method's own settings: " + "; ".join(
            f"{m}: {' '.join(ov)}" for m, ov in sorted(settings.items(), key=lambda kv: list(METHODS).index(kv[0]))) + "."]
    datasets = sorted({d for d, _ in s.final})
    groups = sorted({g for _, g in s.final}, key=group_order)
    methods = sorted({g[0] for g in groups}, key=list(METHODS).index)
    paper_cols = [m for m in methods if any((d, m) in paper for d in datasets)]
    head = ["dataset", *(group_label(g) for g in groups), *(f"paper {m.upper()}" for m in paper_cols), "p (CLOOB vs CLIP)"]
    out += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    notes = set()
    for d in datasets:
        cells = []
        for g in groups:
            summary = s.final.get((d, g))
            cmp = s.comparisons.get((d, g[1:]))
            text = _fmt(summary.mean, summary.std) if summary else "-"
            if summary and cmp and cmp.significant and g[0] in ("cloob", "clip"):
                better = (cmp.t > 0) == (g[0] == "cloob")
                text = f"**{text}**" if better else text
            cells.append(text)
        for m in paper_cols:
            ref = paper.get((d, m))
            cells.append("-" if ref is None else f"{ref[0]:.2f}" + (f" ± {ref[1]:.2f}" if ref[1] is not None else ""))
        ps = [c for (dd, _), c in s.comparisons.items() if dd == d]
        if ps and all(c.p is not None for c in ps):
            cells.append(", ".join(f"{c.p:.3g}" for c in ps))
        else:
            cells.append("-")
            notes.update(c.reason for c in ps if c.reason)
        out.append("| " + " | ".join([d, *cells]) + " |")
    if not s.comparisons:
        both = {"cloob", "clip"} <= set(methods)
        notes.add("no test: CLOOB and CLIP share no setting (each has its own sweep)" if both
                  else "no test: the study does not train both CLOOB and CLIP")
    if seeds < 2:
        notes.add(f"{seeds} seed: too few seeds for any test")
    if notes:
        out += [""] + [f"- {n}" for n in sorted(notes)]
    if s.missing:
        out += ["", f"Runs with no evaluation yet: {', '.join(s.missing)}."]
    out += _ranking_markdown(rank_settings(s), datasets)
    out += ["", "![zero-shot accuracy against step](study.png)", "",
            "![effective eigenvalues and Ajne statistic over training](diagnostics.png)", "",
            "The numbers drawn: `study.json`."]
    return "\n".join(out) + "\n"


def _ranking_markdown(ranking: dict[str, list[dict]], datasets: list[str]) -> list[str]:
    if not ranking:
        return []
    out = ["", "## Settings, best first", "",
           "Per method, each setting's mean over the sets of its mean over seeds at the last step (%); "
           "worst seed: that seed's mean over the sets. Each method's first row is its best setting.", ""]
    head = ["method", "setting", "mean over sets", "worst seed", *datasets]
    out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, rows in sorted(ranking.items(), key=lambda kv: list(METHODS).index(kv[0])):
        for i, r in enumerate(rows):
            setting = group_label(r["group"]).removeprefix(method).strip() or "(recipe)"
            worst = f"{100 * r['worst_seed'][1]:.1f} (seed {r['worst_seed'][0]})" if r["worst_seed"] else "-"
            score = f"{100 * r['score']:.1f}" + ("" if r["complete"] else " (sets missing)")
            cells = [f"{100 * r['per_set'][d]:.1f}" if d in r["per_set"] else "-" for d in datasets]
            out.append("| " + " | ".join([method if i == 0 else "", f"**{setting}**" if i == 0 else setting, score,
                                          worst, *cells]) + " |")
    return out


def study_data(s: StudySummary) -> dict:
    """Everything the report prints or draws, as JSON-ready data (study.json)."""
    return {
        "final": [{"dataset": d, "group": group_label(g), "n": v.n, "mean": v.mean, "std": v.std,
                   "values": s.final_values[(d, g)]} for (d, g), v in sorted(s.final.items(), key=str)],
        "tests": [{"dataset": d, "arch": k[0], "point": list(map(list, k[1])), "test": TEST_NAME, "t": c.t, "df": c.df,
                   "p": c.p, "significant": c.significant, "reason": c.reason} for (d, k), c in s.comparisons.items()],
        "accuracy": [{"dataset": d, "group": group_label(g), "points": [[st, v.mean, v.std] for st, v in pts]}
                     for (d, g), pts in sorted(s.curves.items(), key=lambda kv: (kv[0][0], group_order(kv[0][1])))],
        "diagnostics": [{k: v for k, v in d.items() if k != "group"} for d in s.diagnostics],
        "eigenvalue_change": {w: relative_eigenvalue_change(s.diagnostics, w) for w in ("image", "text")},
        "missing": s.missing,
        "ranking": {m: [{"setting": group_label(r["group"]), "point": [list(p) for p in r["group"][2]],
                         "arch": r["group"][1], "score": r["score"], "per_set": r["per_set"],
                         "worst_seed": list(r["worst_seed"]) if r["worst_seed"] else None, "complete": r["complete"]}
                        for r in rows] for m, rows in rank_settings(s).items()},
    }


def _mean_by(points: list[dict], key: str, value: str) -> dict[str, list[tuple[int, float]]]:
    """label -> [(step, mean of value over seeds and sets)]."""
    acc: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for p in points:
        if p.get(value) is not None:
            acc[p[key]][p["step"]].append(p[value])
    return {k: [(st, sum(v) / len(v)) for st, v in sorted(steps.items())] for k, steps in acc.items()}


def render_pngs(data: dict) -> dict[str, bytes]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from cloob.results.figure import method_colors, png_bytes

    files = {}
    datasets = sorted({a["dataset"] for a in data["accuracy"]}) or ["(none)"]
    groups = list(dict.fromkeys(a["group"] for a in data["accuracy"]))
    outside = len(groups) > 4  # a tuning study's many settings: one legend beside the panels, not over them
    fig = Figure(figsize=(4.5 * len(datasets) + (2.6 if outside else 0), 3.6))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(datasets), squeeze=False).ravel()
    colors = dict(zip(groups, method_colors([g.split()[0] for g in groups])))
    # Shades of one method's colour are close: a marker of its own for each of its settings too.
    nth = {g: [x.split()[0] for x in groups[:i]].count(g.split()[0]) for i, g in enumerate(groups)}
    for ax, d in zip(axes, datasets):
        series = [a for a in data["accuracy"] if a["dataset"] == d]
        for a in series:
            st = [p[0] for p in a["points"]]
            mean = [100 * p[1] for p in a["points"]]
            std = [100 * (p[2] or 0.0) for p in a["points"]]
            color = colors[a["group"]]
            ax.plot(st, mean, marker="os^Dv<>P*X"[nth[a["group"]] % 10], markersize=3 if not outside else 4, color=color,
                    label=a["group"])
            ax.fill_between(st, [m - e for m, e in zip(mean, std)], [m + e for m, e in zip(mean, std)], color=color,
                            alpha=0.2 if not outside else 0.08)
        ax.set_title(d)
        ax.set_xlabel("step")
        ax.set_ylabel("zero-shot accuracy (%)")
        ax.grid(alpha=0.3)
        if series and not outside:
            ax.legend(fontsize=7)
    if outside:
        handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, fontsize=7, loc="center right")
    fig.suptitle("Zero-shot accuracy over training (mean ± std over seeds)")
    fig.subplots_adjust(top=0.82, bottom=0.15, wspace=0.3, right=1 - 2.7 / fig.get_figwidth() if outside else 0.95)
    files["study.png"] = png_bytes(fig)

    fig = Figure(figsize=(12, 7))
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2).ravel()
    panels = [(data["eigenvalue_change"]["image"], "relative_change", "image: effective eigenvalues, change vs first step"),
              (data["eigenvalue_change"]["text"], "relative_change", "text: effective eigenvalues, change vs first step"),
              (data["diagnostics"], "image_ajne", "image: Ajne statistic (lower: more uniform)"),
              (data["diagnostics"], "text_ajne", "text: Ajne statistic (lower: more uniform)")]
    for ax, (points, value, title) in zip(axes, panels):
        for method, pts in sorted(_mean_by(points, "method", value).items()):
            known = METHODS.get(method)
            objective, retrieval = (known.objective, known.retrieval) if known else ("?", "?")
            label = f"{method} ({objective}, {'Hopfield' if retrieval == 'hopfield' else 'no retrieval'})"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=3,
                    color=method_colors([method])[0], label=label)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Diagnostics over training (mean over seeds and sets)")
    fig.subplots_adjust(hspace=0.4, wspace=0.25)
    files["diagnostics.png"] = png_bytes(fig)
    return files


def render_study(name: str, s: StudySummary, paper: dict, seeds: int,
                 settings: dict[str, list[str]] | None = None) -> dict[str, bytes]:
    """The report's files, name -> bytes (FILES)."""
    data = study_data(s)
    return {"study.md": render_markdown(name, s, paper, seeds, settings).encode(), **render_pngs(data),
            "study.json": (json.dumps(data, indent=1, default=str) + "\n").encode()}


def write_study(name: str, cells_by_run: dict, results: str, out: str, data: str, arch: str | None,
                epochs: int | None, seeds: int) -> dict[str, bytes]:
    """The study's report from the results table at `results`: its files (FILES) written atomically
    under `out` (study.md last, so that its links resolve once it is there), and returned.
    cells_by_run: run id -> its cloob.study.cells.Cell; data, arch, epochs: for the paper's numbers."""
    import posixpath

    from cloob.results.table import read_rows
    from cloob.storage import atomic_write_bytes
    from cloob.study.summary import summarize_study

    summary = summarize_study(cells_by_run, read_rows(results, latest=True).to_pylist())
    files = render_study(name, summary, paper_numbers(data, arch, epochs), seeds, method_settings(list(cells_by_run.values())))
    for fname, blob in sorted(files.items(), key=lambda kv: kv[0] == "study.md"):
        atomic_write_bytes(posixpath.join(out, fname), blob)
    return files

