"""A study's numbers from the results table: per dataset, each group's (method x arch x swept point)
mean and std over seeds at the final step, CLOOB against CLIP by Welch's t-test, accuracy against
step (mean and std over seeds), and the diagnostics over training, one point per (run, step, set).

Input is the study's cells with their run ids and the table's rows (cloob.results.table.read_rows,
latest); nothing here reads a store or draws.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from cloob.study.cells import Cell
from cloob.study.stats import Comparison, Summary, summarize, welch

DIAGNOSTICS = ("image_effective_eigenvalues", "text_effective_eigenvalues", "image_ajne", "text_ajne")


@dataclass
class StudySummary:
    final: dict[tuple[str, tuple], Summary] = field(default_factory=dict)  # (dataset, group) -> at the last step
    final_values: dict[tuple[str, tuple], list[float]] = field(default_factory=dict)  # in seed order
    final_seeds: dict[tuple[str, tuple], list[int]] = field(default_factory=dict)  # the seeds of final_values
    comparisons: dict[tuple[str, tuple], Comparison] = field(default_factory=dict)  # (dataset, (arch, point))
    curves: dict[tuple[str, tuple], list[tuple[int, Summary]]] = field(default_factory=dict)  # accuracy over steps
    diagnostics: list[dict] = field(default_factory=list)  # one per (run, step, set)
    missing: list[str] = field(default_factory=list)  # runs of the study with no row


def summarize_study(cells_by_run: dict[str, Cell], rows: list[dict], compare: tuple[str, str] = ("cloob", "clip"),
                    metric: str = "main_value") -> StudySummary:
    """cells_by_run: run id -> its cell; rows: the results table's latest rows (other runs are ignored)."""
    out = StudySummary()
    mine = [r for r in rows if r.get("run_id") in cells_by_run and r.get("step") is not None and r.get(metric) is not None]
    last_step: dict[str, int] = {}
    for r in mine:
        last_step[r["run_id"]] = max(last_step.get(r["run_id"], r["step"]), r["step"])
    out.missing = sorted(set(cells_by_run) - set(last_step))

    by_step: dict[tuple[str, tuple, int], list[float]] = defaultdict(list)
    finals: dict[tuple[str, tuple], list[tuple[int, float]]] = defaultdict(list)
    for r in sorted(mine, key=lambda r: (r["dataset"], r["run_id"], r["step"])):
        cell = cells_by_run[r["run_id"]]
        by_step[(r["dataset"], cell.group, r["step"])].append(r[metric])
        if r["step"] == last_step[r["run_id"]]:
            finals[(r["dataset"], cell.group)].append((cell.seed, r[metric]))
        out.diagnostics.append({"run_id": r["run_id"], "method": cell.method, "seed": cell.seed, "group": cell.group,
                                "dataset": r["dataset"], "step": r["step"], **{k: r.get(k) for k in DIAGNOSTICS}})
    for key, pairs in finals.items():
        values = [v for _, v in sorted(pairs)]
        out.final_values[key] = values
        out.final_seeds[key] = sorted(seed for seed, _ in pairs)
        out.final[key] = summarize(values)
    curves: dict[tuple[str, tuple], list[tuple[int, Summary]]] = defaultdict(list)
    for (dataset, group, step), values in sorted(by_step.items(), key=lambda kv: (kv[0][0], str(kv[0][1]), kv[0][2])):
        curves[(dataset, group)].append((step, summarize(values)))
    out.curves = dict(curves)
    a, b = compare
    for (dataset, group), values in out.final_values.items():
        method, arch, point = group
        if method != a:
            continue
        other = out.final_values.get((dataset, (b, arch, point)))
        if other is not None:
            out.comparisons[(dataset, (arch, point))] = welch(values, other)
    return out


def rank_settings(s: StudySummary) -> dict[str, list[dict]]:
    """Per method with more than one setting (architecture x swept point): its settings, best first, by
    the mean over the sets of the mean over seeds at the last step. Each also says its worst seed (that
    seed's mean over the sets), since a setting that fails on one seed in three is no demo setting."""
    datasets = sorted({d for d, _ in s.final})
    by_method: dict[str, list[tuple]] = defaultdict(list)
    for g in sorted({g for _, g in s.final}, key=str):
        by_method[g[0]].append(g)
    out = {}
    for method, groups in by_method.items():
        if len(groups) < 2:
            continue
        rows = []
        for g in groups:
            per_set = {d: s.final[(d, g)].mean for d in datasets if (d, g) in s.final}
            per_seed: dict[int, list[float]] = defaultdict(list)
            for d in per_set:
                for seed, v in zip(s.final_seeds[(d, g)], s.final_values[(d, g)]):
                    per_seed[seed].append(v)
            complete = {seed: sum(v) / len(v) for seed, v in per_seed.items() if len(v) == len(per_set)}
            rows.append({"group": g, "score": sum(per_set.values()) / len(per_set), "per_set": per_set,
                         "worst_seed": min(complete.items(), key=lambda kv: kv[1]) if complete else None,
                         "complete": len(per_set) == len(datasets)})
        out[method] = sorted(rows, key=lambda r: (not r["complete"], -r["score"]))
    return out


def relative_eigenvalue_change(diagnostics: list[dict], which: str = "image") -> list[dict]:
    """Per run and set: (number of effective eigenvalues at a step / at the run's first evaluated step) - 1,
    the blog's figure of how retrieval changes the embedding's dimensionality over training."""
    key = f"{which}_effective_eigenvalues"
    first: dict[tuple[str, str], tuple[int, float]] = {}
    for d in diagnostics:
        if d.get(key) is None:
            continue
        k = (d["run_id"], d["dataset"])
        if k not in first or d["step"] < first[k][0]:
            first[k] = (d["step"], d[key])
    out = []
    for d in diagnostics:
        k = (d["run_id"], d["dataset"])
        if d.get(key) is None or k not in first or not first[k][1]:
            continue
        out.append({**{x: d[x] for x in ("run_id", "method", "seed", "dataset", "step")},
                    "reference_step": first[k][0], "relative_change": d[key] / first[k][1] - 1.0})
    return out
