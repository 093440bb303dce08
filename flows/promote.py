"""The pipeline's promotion step: after a retrain's evaluations end, each newly registered model (the
challenger) is compared with the `champion` on the rule (cloob/registry/promotion.py), optionally
confirmed by a reviewer in the Prefect UI, and recorded in the registry.

Called in a flow's body (a pause belongs to the flow run, not to a task):

    promote_models(registry, results, [entry ids], rule, approval=..., evaluate_champion=...)

- the champion is first evaluated on the same sets with the same settings (an `evaluate` task per
  set, Skipped when its row is already in the table), so both models' numbers are comparable;
- each challenger's decision is a `decide-<run>` task; a model decided before (in an earlier run)
  is left alone, so a rerun on unchanged data promotes nothing;
- with approval, a winning challenger pauses the flow run for a reviewer: the UI shows the decision
  and a form (approve: yes/no, comment). Approved: champion moves. Rejected: challenger moves, with
  the reviewer's comment. No answer within approval_timeout_s: nothing is promoted, `challenger`
  moves with the approval outcome "timed out" (a later run asks again), the log says so, and Prefect
  ends the run Failed ("The flow was failed and never resumed."): a pause that timed out cannot
  resume, so the run cannot end green;
- the decisions are logged and published as the markdown artifact `cloob-promotion` of the run.
"""

from __future__ import annotations

from collections.abc import Callable

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.input import RunInput
from prefect.runtime import task_run

PROMOTION_ARTIFACT = "cloob-promotion"


class Approval(RunInput):
    """The reviewer's form: promote the challenger to champion or not, and why."""

    approve: bool = False
    comment: str = ""


def _decide_name() -> str:
    return f"decide-{str(task_run.parameters.get('label') or 'challenger')}"


@task(name="decide-promotion", task_run_name=_decide_name)
def decide(registry: str, results: str, challenger: str, rule: dict, label: str | None = None) -> dict | None:
    """The decision on one challenger against the current champion; None when there is nothing to
    decide (it is the champion, or was decided before)."""
    from cloob.registry import Registry
    from cloob.registry import promotion as P

    reg = Registry(registry)
    champion = reg.aliases().get(P.CHAMPION)
    if champion == challenger:
        get_run_logger().info("%s is the champion: nothing to decide", label or challenger[:12])
        return None
    if (before := P.decided_before(reg, challenger)) is not None:
        get_run_logger().info("%s was decided before: %s", label or challenger[:12], P.summary(before))
        return None
    return P.decide(reg, results, challenger, rule)


@task(name="record-promotion", task_run_name="record-promotion")
def record(registry: str, decision: dict) -> dict | None:
    from cloob.registry import Registry
    from cloob.registry import promotion as P

    try:
        return P.record(Registry(registry), decision)
    except P.StaleDecision as e:  # another promotion moved the champion since this decision
        get_run_logger().warning("not recorded: %s; deciding again against it", e)
        return {"stale": e.champion}


def _ask_reviewer(decision: dict, timeout_s: int, attempt: int = 0) -> dict:
    """Pause the flow run for a reviewer; the decision with the approval's outcome."""
    from prefect.exceptions import FlowPauseTimeout
    from prefect.flow_runs import pause_flow_run

    from cloob.registry import promotion as P

    form = Approval.with_initial_data(description=P.report(decision) + "\n\nPromote the challenger to champion?",
                                      approve=True)
    logger = get_run_logger()
    logger.warning("waiting up to %d s for a reviewer to approve: %s (the flow run's page: Resume)", timeout_s,
                   P.summary(decision))
    try:
        answer = pause_flow_run(wait_for_input=form, timeout=timeout_s,
                                key=f"approve-{decision['challenger']['id'][:12]}" + (f"-{attempt}" if attempt else ""))
    except FlowPauseTimeout:
        return {**decision, "promoted": False, "reason": f"approval timed out after {timeout_s} s",
                "approval": {"outcome": "timed out", "comment": None}}
    if answer.approve:
        return {**decision, "approval": {"outcome": "approved", "comment": answer.comment}}
    return {**decision, "promoted": False, "reason": "rejected by the reviewer" + (f": {answer.comment}" if answer.comment
                                                                                 else ""),
            "approval": {"outcome": "rejected", "comment": answer.comment}}


def _decide_and_record(registry: str, results: str, cid: str, rule: dict, label: str, approval: bool,
                       approval_timeout_s: int, notes: list[str]) -> dict | None:
    """One challenger decided, reviewed if asked, recorded; decided again when another promotion moved
    the champion in between (cloob.registry.promotion.record). None: nothing recorded."""
    from cloob.errors import CloobError
    from cloob.registry import promotion as P

    logger = get_run_logger()
    for attempt in range(P.STALE_RETRIES):
        try:
            d = decide(registry, results, cid, rule, label)
        except CloobError as e:
            logger.error("%s not decided: %s", label, e)
            notes.append(f"**{label} not decided**: {e}")
            return None
        if d is None:
            return None
        if d["promoted"] and approval:  # the first champion too: every move of champion is reviewed
            d = _ask_reviewer(d, approval_timeout_s, attempt)
        if not (record(registry, d) or {}).get("stale"):
            return d
    notes.append(f"**{label} not decided**: the champion kept moving ({P.STALE_RETRIES} tries); "
                 "`cloob registry promote` decides it later")
    return None


def promote_models(registry: str, results: str, candidates: list[str], rule: dict | None = None, *,
                   approval: bool = False, approval_timeout_s: int = 3600,
                   evaluate_champion: Callable[[dict], list] | None = None) -> list[dict]:
    """Decide each candidate (entry ids, in registration order) against the champion of the moment,
    record the decisions, log them and publish them as the `cloob-promotion` artifact. Returns the
    decisions recorded."""
    from prefect.futures import wait

    from cloob.errors import CloobError
    from cloob.registry import Registry
    from cloob.registry import promotion as P

    logger = get_run_logger()
    rule = P.PromotionRule.of(rule).as_dict()
    reg = Registry(registry)
    entries = {e["id"]: e for e in reg.entries()}
    decisions, notes = [], []
    champion = reg.aliases().get(P.CHAMPION)
    # A model is decided once: the champion and the models decided in an earlier run are left out here
    # (the decide task says so too), so a rerun evaluates nothing for the champion either.
    todo = [c for c in dict.fromkeys(candidates) if c != champion and P.decided_before(reg, c) is None]
    for c in dict.fromkeys(candidates):
        if c not in todo:
            logger.info("%s: nothing to decide (%s)", entries.get(c, {}).get("run_id", c[:12]),
                        "the champion" if c == champion else "decided before")
    for cid in todo:
        label = f"{entries.get(cid, {}).get('run_id')}-step{entries.get(cid, {}).get('step')}"
        champion = reg.aliases().get(P.CHAMPION)
        if champion and champion not in candidates and evaluate_champion is not None and champion in entries:
            futures = evaluate_champion(entries[champion])
            wait(futures)
            for f in futures:
                if not f.state.is_completed():
                    logger.error("the champion's evaluation failed: %s", f.state.message)
            evaluate_champion = None  # once: it stays champion until a challenger wins, and then it is evaluated
        d = _decide_and_record(registry, results, cid, rule, label, approval, approval_timeout_s, notes)
        if d is None:
            continue
        text = P.report(d)
        (logger.info if d["promoted"] else logger.warning)("%s", text)
        decisions.append(d)
        if d.get("approval", {}).get("outcome") == "timed out":
            break  # the run cannot go on: Prefect fails a pause that timed out
    body = "\n\n---\n\n".join([P.report(d) for d in decisions] + notes) or \
        "No new challenger: every model of this run was decided before (or is the champion)."
    champion = reg.aliases().get(P.CHAMPION)
    body += f"\n\nchampion: {entries.get(champion, {}).get('run_id', champion)} ({(champion or 'none')[:12]})"
    create_markdown_artifact(body, key=PROMOTION_ARTIFACT, description="promotion decisions: champion vs challengers")
    if decisions and decisions[-1].get("approval", {}).get("outcome") == "timed out":
        raise CloobError(f"no reviewer answered within {approval_timeout_s} s: nothing was promoted",
                         "approve later with `cloob registry promote <entry>` or rerun the pipeline (it asks again)")
    return decisions
