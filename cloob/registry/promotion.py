"""Promotion by evaluation: the `champion` alias moves to a new model only when it wins.

A challenger (a newly registered entry) is compared with the entry `champion` points at, on the
rule's sets, each under the same eval settings and the same data (the rows' eval_settings_hash and
dataset_hash must match; the newest such row of each model):

    score   = the mean over the sets of each row's main metric (one set: that set's number)
    gain    = challenger's score - champion's score
    wins    = gain > min_gain, and, with require_significant, the lower end of the paired bootstrap's
              interval (at `confidence`) is above min_gain too

With no champion yet the challenger becomes champion. A winner moves `champion`; a loser moves
`challenger`; either move carries the decision (the rule, both models' numbers per set, the gain
and the interval) in the alias's history (`cloob registry history champion`). A model is decided
once, when it is new: a rerun, or a later champion, does not decide it again, so a rerun promotes
nothing.

The paired bootstrap: both models scored the same images (checked by the images' ids kept in each
row's outcomes file, cloob/results/outcomes.py). Each replicate draws every set's images with
replacement (the same draw for both models), recomputes each set's main metric for both, and takes
the difference of the means over the sets. The interval is the replicates' central `confidence`
quantiles. Rows without outcomes (written by an older version) or whose images differ compare on
their means only: the decision says that no interval was possible, and a rule that requires
significance does not promote on it.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime

import numpy as np

from cloob.errors import CloobError
from cloob.registry.store import Registry, RegistryError

CHAMPION = "champion"
CHALLENGER = "challenger"
STALE_RETRIES = 5  # decisions made again when another promotion moved the champion meanwhile


@dataclass
class PromotionRule:
    """How a challenger beats the champion.

    promote_on: the sets whose main metric is compared; their mean decides (one set: that set). Empty:
        every set both models were evaluated on under the same settings and data.
    min_gain: how much higher the challenger's score must be, as a fraction (0.01: one point).
    require_significant: also require the paired bootstrap interval's lower end to be above min_gain.
    confidence: the interval's level (0.95: the 2.5% and 97.5% quantiles).
    bootstrap: replicates of the paired bootstrap.
    seed: the bootstrap's random seed (the same numbers give the same interval).
    """

    promote_on: list[str] = field(default_factory=list)
    min_gain: float = 0.0
    require_significant: bool = False
    confidence: float = 0.95
    bootstrap: int = 2000
    seed: int = 0

    def __post_init__(self):
        if isinstance(self.promote_on, str):
            self.promote_on = [self.promote_on]
        self.promote_on = list(self.promote_on or [])
        if not 0 < self.confidence < 1:
            raise CloobError(f"promotion confidence {self.confidence} must be between 0 and 1", "use 0.95")
        if self.bootstrap < 100:
            raise CloobError(f"promotion bootstrap {self.bootstrap} replicates are too few", "use 2000")
        if not -1 < self.min_gain < 1:
            raise CloobError(f"promotion min_gain {self.min_gain} is a fraction of the metric, between -1 and 1",
                             "use 0.01 for one point")

    @classmethod
    def of(cls, value: PromotionRule | dict | None) -> PromotionRule:
        if isinstance(value, PromotionRule):
            return value
        value = dict(value or {})
        unknown = sorted(set(value) - set(cls.__dataclass_fields__))
        if unknown:
            raise CloobError(f"promotion rule has unknown field(s) {unknown}",
                             f"use {', '.join(cls.__dataclass_fields__)}")
        return cls(**value)

    def as_dict(self) -> dict:
        return asdict(self)


class PromotionError(CloobError):
    pass


# ----------------------------------------------------------------------------------- the bootstrap

def _set_metric(main_metric: str, correct: np.ndarray, labels: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """The metric of each replicate (a row of idx, image positions drawn with replacement)."""
    c = correct[idx]
    if main_metric != "mean_per_class_recall":
        return c.mean(axis=1)
    classes, lab = np.unique(labels, return_inverse=True)
    k, (b, _) = len(classes), idx.shape
    key = (np.arange(b)[:, None] * k + lab[idx]).ravel()
    hits = np.bincount(key, weights=c.ravel(), minlength=b * k).reshape(b, k)
    counts = np.bincount(key, minlength=b * k).reshape(b, k)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = hits / counts
    return np.nanmean(recall, axis=1)  # the classes a replicate holds, as the metric takes the classes present


def paired_bootstrap(sets: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]], *, replicates: int, seed: int,
                     confidence: float) -> tuple[float, float]:
    """sets: (main_metric, labels, challenger correct, champion correct), aligned image by image.
    The central `confidence` interval of (challenger - champion) in the mean of the sets' metrics."""
    rng = np.random.default_rng(seed)
    diffs = np.zeros(replicates)
    for metric, labels, a, b in sets:
        n = len(labels)
        chunk = max(1, min(replicates, 4_000_000 // max(n, 1)))
        for s in range(0, replicates, chunk):
            idx = rng.integers(0, n, size=(min(chunk, replicates - s), n))
            diffs[s:s + len(idx)] += _set_metric(metric, a, labels, idx) - _set_metric(metric, b, labels, idx)
    diffs /= len(sets)
    tail = (1 - confidence) / 2
    return float(np.quantile(diffs, tail)), float(np.quantile(diffs, 1 - tail))


def _aligned(a, b) -> tuple[np.ndarray, np.ndarray, np.ndarray] | str:
    """(labels, a's correct, b's correct) in one image order; or why they cannot be paired."""
    if len(a) != len(b):
        return f"the models scored different numbers of images ({len(a)} and {len(b)})"
    oa, ob = np.argsort(a.ids, kind="stable"), np.argsort(b.ids, kind="stable")
    if not np.array_equal(a.ids[oa], b.ids[ob]):
        return "the models scored different images"
    if not np.array_equal(a.labels[oa], b.labels[ob]):
        return "the same images carry different labels"
    return a.labels[oa], a.correct[oa], b.correct[ob]


# ------------------------------------------------------------------------------------- the decision

def _rows_by_set(results_uri: str, entry_id: str) -> dict[str, list[dict]]:
    from cloob.results.table import read_rows

    out: dict[str, list[dict]] = {}
    for r in read_rows(results_uri, latest=False).to_pylist():
        if r["checkpoint_id"] == entry_id and r["main_value"] is not None:
            out.setdefault(r["dataset"], []).append(r)
    for rows in out.values():
        rows.sort(key=lambda r: (r["finished_at"], r["row_uuid"]), reverse=True)  # newest first
    return out


def _same_conditions(a: dict, b: dict) -> bool:
    return (a["eval_settings_hash"], a["dataset_hash"], a["main_metric"]) == \
        (b["eval_settings_hash"], b["dataset_hash"], b["main_metric"])


def _describe(entry: dict | None) -> dict | None:
    if entry is None:
        return None
    return {k: entry.get(k) for k in ("id", "run_id", "step", "method", "arch", "data_name", "data_manifest_hash")}


def decide(registry: Registry, results_uri: str, challenger: str, rule: PromotionRule | dict | None = None,
           *, champion: str | None = None) -> dict:
    """The decision on `challenger` (an alias, id or URI) against the current champion (or `champion`):
    a dict that `record` writes into the alias history. Nothing moves here."""
    from cloob.results import outcomes

    rule = PromotionRule.of(rule)
    ch = registry.resolve(challenger)
    champ_id = champion if champion is not None else registry.aliases().get(CHAMPION)
    cp = registry.resolve(champ_id) if champ_id else None
    decision = {"challenger": _describe(ch), "champion": _describe(cp), "rule": rule.as_dict(),
                "decided_at": datetime.now(UTC).isoformat(timespec="seconds"), "sets": [], "challenger_score": None,
                "champion_score": None, "gain": None, "interval": None, "interval_note": None, "promoted": False}
    if cp is None:
        return {**decision, "promoted": True, "reason": "no champion yet"}
    if cp["id"] == ch["id"]:
        return {**decision, "reason": "the challenger is the champion"}
    mine, theirs = _rows_by_set(results_uri, ch["id"]), _rows_by_set(results_uri, cp["id"])
    names = rule.promote_on or sorted(d for d in mine if d in theirs)
    if not names:
        raise PromotionError(f"{ch['run_id']} ({ch['id'][:12]}) and the champion {cp['run_id']} ({cp['id'][:12]}) "
                             "have no evaluation set in common",
                             "evaluate both on the same sets: cloob evaluate champion <challenger> --datasets ...")
    pairs, missing = [], []
    for name in names:
        if name not in mine:
            missing.append(f"{name}: the challenger has no row")
            continue
        a = mine[name][0]  # the challenger's newest row decides the conditions
        b = next((r for r in theirs.get(name, []) if _same_conditions(a, r)), None)
        if b is None:
            missing.append(f"{name}: the champion has no row with the challenger's eval settings and data "
                           f"(settings {a['eval_settings_hash'][:12]}, data {str(a['dataset_hash'])[:12]})")
            continue
        pairs.append((name, a, b))
    if missing:
        raise PromotionError(f"cannot compare {ch['run_id']} with the champion {cp['run_id']} on the same sets "
                             f"and settings: {'; '.join(missing)}",
                             "evaluate both on these sets with the same settings "
                             f"(cloob evaluate champion {ch['id'][:12]} --datasets {' '.join(names)}), then promote")
    sets, boot, why_not = [], [], None
    for name, a, b in pairs:
        sets.append({"dataset": name, "main_metric": a["main_metric"], "n_images": a["n_images"],
                     "challenger": a["main_value"], "champion": b["main_value"],
                     "gain": a["main_value"] - b["main_value"], "eval_settings_hash": a["eval_settings_hash"],
                     "dataset_hash": a["dataset_hash"], "challenger_row": a["row_uuid"], "champion_row": b["row_uuid"]})
        if why_not:
            continue
        if a["main_metric"] not in outcomes.SUPPORTED:
            why_not = f"{name}: no per-image form of {a['main_metric']}"
            continue
        oa, ob = outcomes.read(results_uri, a["row_uuid"]), outcomes.read(results_uri, b["row_uuid"])
        if oa is None or ob is None:
            who = " and ".join(w for w, o in (("the challenger's", oa), ("the champion's", ob)) if o is None)
            why_not = f"{name}: {who} row keeps no per-image outcomes (evaluated by an older version)"
            continue
        aligned = _aligned(oa, ob)
        if isinstance(aligned, str):
            why_not = f"{name}: {aligned}"
            continue
        boot.append((a["main_metric"], *aligned))
    score_a = float(np.mean([s["challenger"] for s in sets]))
    score_b = float(np.mean([s["champion"] for s in sets]))
    gain = score_a - score_b
    interval = None
    if why_not is None:
        interval = list(paired_bootstrap(boot, replicates=rule.bootstrap, seed=rule.seed, confidence=rule.confidence))
    wins = gain > rule.min_gain
    if not wins:
        reason = f"gain {100 * gain:+.2f} points is not above min_gain {100 * rule.min_gain:.2f}"
    elif rule.require_significant and interval is None:
        wins, reason = False, "significance required, but no interval was possible"
    elif rule.require_significant and interval[0] <= rule.min_gain:
        wins, reason = False, (f"gain {100 * gain:+.2f} points, but the {rule.confidence:.0%} interval's lower end "
                               f"{100 * interval[0]:+.2f} is not above min_gain {100 * rule.min_gain:.2f}: noise")
    else:
        reason = f"gain {100 * gain:+.2f} points above min_gain {100 * rule.min_gain:.2f}" + \
            (f", {rule.confidence:.0%} interval lower end {100 * interval[0]:+.2f}" if rule.require_significant else "")
    return {**decision, "sets": sets, "challenger_score": score_a, "champion_score": score_b, "gain": gain,
            "interval": interval, "interval_note": None if interval else f"no interval: {why_not}",
            "promoted": wins, "reason": reason}


class StaleDecision(Exception):
    """The champion moved between a decision and its record (another promotion at the same moment):
    nothing was written; decide again against the champion of now."""

    def __init__(self, champion: str | None):
        super().__init__(f"the champion moved to {champion} meanwhile")
        self.champion = champion


@contextlib.contextmanager
def _promotion_lock(registry: Registry, poll_s: float = 0.2):
    """The registry's promotion lock (cloob.lock, local or S3), held for the few reads and the one
    write of a record; a second promotion waits for it."""
    from cloob.lock import LockHeld, folder_lock

    while True:
        try:
            with folder_lock(registry.loc.url("locks"), name="promotion.json", purpose="cloob registry promote",
                             label="the registry's promotion"):
                yield
                return
        except LockHeld:
            time.sleep(poll_s)


def record(registry: Registry, decision: dict, *, again: bool = False) -> dict | None:
    """Write the decision: `champion` moves to a winner, `challenger` to a loser; the move carries the
    decision. None when there is nothing to move (the challenger is the champion, or another
    promotion decided it meanwhile, unless `again`: a model decided once more on purpose).

    Under the registry's promotion lock the champion is read again: two retrains promoting at once
    each decide against the same champion, and the second to record would otherwise move `champion`
    on a comparison with a model that is no longer the champion (the better of the two could lose
    its place to the worse). Then StaleDecision is raised and nothing is written."""
    ch = decision["challenger"]["id"]
    if decision["champion"] and decision["champion"]["id"] == ch:
        return None
    with _promotion_lock(registry):
        if not again and decided_before(registry, ch) is not None:
            return None
        now = registry.aliases().get(CHAMPION)
        if now != (decision["champion"] or {}).get("id"):
            raise StaleDecision(now)
        alias = CHAMPION if decision["promoted"] else CHALLENGER
        return registry.set_alias(alias, ch, reason=summary(decision), decision=decision)


def decided_before(registry: Registry, challenger_id: str) -> dict | None:
    """The decision already recorded on this model, if any: a model is a challenger once, when it is
    new (a rerun, or a later champion, does not decide it again). An approval that timed out decided
    nothing: the next run asks again."""
    for alias in (CHAMPION, CHALLENGER):
        for move in registry.alias_history(alias):
            d = move.get("decision")
            if d and d["challenger"]["id"] == challenger_id and (d.get("approval") or {}).get("outcome") != "timed out":
                return d
    return None


def promote(registry: Registry, results_uri: str, candidates: list[str], rule: PromotionRule | dict | None = None,
            *, approve=None, again: bool = False) -> list[dict]:
    """Decide and record each candidate in turn against the champion of the moment (a winner is the
    next one's champion). approve(decision) -> decision lets a person confirm a promotion. A candidate
    that is the champion, or was decided before, is left as it is (its entry in the list says so,
    with `recorded: False`), unless `again` (a changed rule, new evaluations): then it is decided
    against today's champion."""
    out = []
    for ref in candidates:
        entry = registry.resolve(ref)
        champ = registry.aliases().get(CHAMPION)
        if champ == entry["id"]:
            out.append({"challenger": _describe(entry), "recorded": False, "reason": "already the champion",
                        "promoted": False})
            continue
        if not again and (before := decided_before(registry, entry["id"])) is not None:
            out.append({**before, "recorded": False, "reason": f"decided before: {before['reason']}"})
            continue
        for _ in range(STALE_RETRIES):
            d = decide(registry, results_uri, entry["id"], rule)
            if d["promoted"] and approve is not None:
                d = approve(d)
            try:
                moved = record(registry, d, again=again)
                break
            except StaleDecision:
                continue  # against the champion of now
        else:
            raise CloobError(f"{ref}: the champion kept moving while it was decided ({STALE_RETRIES} tries)",
                             "promote it again when the other promotions have ended")
        out.append({**d, "recorded": moved is not None})
    return out


# ------------------------------------------------------------------------------------------- text

def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f}"


def summary(d: dict) -> str:
    """One line: the verdict and why."""
    who = d["challenger"]["run_id"]
    verdict = "promoted to champion" if d["promoted"] else "not promoted (challenger)"
    return f"{who} {verdict}: {d['reason']}"


def report(d: dict) -> str:
    """The decision as markdown: verdict, rule, both models' numbers per set, interval."""
    ch, cp, rule = d["challenger"], d["champion"], d["rule"]
    lines = [f"**{summary(d)}**", ""]
    sets = ", ".join(rule["promote_on"]) or "every set both were evaluated on"
    lines.append(f"Rule: mean main metric over {sets}; gain > {_pct(rule['min_gain'])} points"
                 + (f", {rule['confidence']:.0%} paired-bootstrap interval above it" if rule["require_significant"]
                    else "") + ".")
    lines.append("")
    lines.append(f"- challenger: {ch['run_id']} step {ch['step']} ({ch['id'][:12]})")
    lines.append(f"- champion: {cp['run_id']} step {cp['step']} ({cp['id'][:12]})" if cp else "- champion: none")
    if d.get("sets"):
        lines += ["", "| set | metric | images | challenger | champion | gain |", "|---|---|---:|---:|---:|---:|"]
        lines += [f"| {s['dataset']} | {s['main_metric']} | {s['n_images']} | {_pct(s['challenger'])} | "
                  f"{_pct(s['champion'])} | {100 * s['gain']:+.2f} |" for s in d["sets"]]
        lines.append(f"| **mean** | | | {_pct(d['challenger_score'])} | {_pct(d['champion_score'])} | "
                     f"{100 * d['gain']:+.2f} |")
        lines.append("")
        if d.get("interval"):
            lo, hi = d["interval"]
            lines.append(f"Paired bootstrap ({rule['bootstrap']} replicates over the images): gain "
                         f"{100 * d['gain']:+.2f} points, {rule['confidence']:.0%} interval "
                         f"[{100 * lo:+.2f}, {100 * hi:+.2f}].")
        else:
            lines.append(d.get("interval_note") or "no interval")
    if d.get("approval"):
        a = d["approval"]
        lines += ["", f"Approval: {a.get('outcome')}" + (f" ({a['comment']})" if a.get("comment") else "")]
    return "\n".join(lines)


__all__ = ["CHALLENGER", "CHAMPION", "PromotionError", "PromotionRule", "RegistryError", "decide", "decided_before",
           "paired_bootstrap", "promote", "record", "report", "summary"]
