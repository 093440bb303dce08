"""What a pipeline run did, said where an operator looks: the flow run's name and tags (its data and
data version, set once the data is prepared) and a summary artifact at its end (data: rows, new,
removed, version and hash; each training: trained, warm-started from what, or skipped; evaluations;
the promotion decisions), or "no change since version N: nothing to do"."""

from __future__ import annotations

from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact

SUMMARY_ARTIFACT = "cloob-pipeline-summary"


def _version(d: dict) -> str:
    return f"v{d.get('version') or 1}"


def name_run(data: list[dict]) -> None:
    """Name and tag this flow run after the data it trains on: `<dataset>-v<N>` (+ the new rows)."""
    from prefect.client.orchestration import get_client
    from prefect.runtime import flow_run

    if not data or flow_run.id is None:
        return
    d = data[0]
    name = f"{d.get('name') or 'data'}-{_version(d)}"
    if d.get("fresh") and d.get("rows_added"):
        name += f"-plus{d['rows_added']}"
    tags = sorted({*(flow_run.tags or []), "cloob", f"data:{d.get('name')}", f"data-version:{_version(d)}"})
    try:
        with get_client(sync_client=True) as client:
            client.update_flow_run(flow_run.id, name=f"{flow_run.flow_name}: {name}", tags=tags)
    except Exception as e:  # noqa: BLE001  (a name is a courtesy: never fail a run for it)
        get_run_logger().warning("could not name the flow run: %s", e)


def summary_markdown(data: list[dict], runs: list[dict], evaluated: int, failed: int,
                     promotion: list[dict]) -> str:
    lines = ["# cloob pipeline run", ""]
    trained = [r for r in runs if not r.get("skipped")]
    if data and not any(d.get("fresh") for d in data) and not trained and not promotion:
        d = data[0]
        return "\n".join(lines + [f"No change since version {_version(d)[1:]} of {d.get('name')} "
                                  f"({d.get('images')} images, content hash {str(d.get('content_hash'))[:12]}): "
                                  "nothing to do."])
    lines += ["## Data", "", "| dataset | version | images | rows added | rows removed | content hash | this run |",
              "|---|---|---:|---:|---:|---|---|"]
    for d in data:
        lines.append(f"| {d.get('name')} | {_version(d)} | {d.get('images')} | {d.get('rows_added') or 0} | "
                     f"{d.get('rows_removed') or 0} | {str(d.get('content_hash'))[:12]} | "
                     f"{'prepared' if d.get('fresh') else 'unchanged'} |")
    lines += ["", "## Trainings", "", "| run | step | what happened |", "|---|---:|---|"]
    for r in runs:
        if r.get("skipped"):
            what = "skipped: already trained on this data version"
        elif r.get("init_from"):
            init = r["init_from"]
            what = f"trained, warm-started from {init.get('ref')} ({str(init.get('entry') or '')[:12]})"
        else:
            what = "trained from scratch"
        lines.append(f"| {r.get('run_dir', '').rstrip('/').rsplit('/', 1)[-1]} | {r.get('step')} | {what} |")
    lines += ["", f"## Evaluations\n\n{evaluated} evaluated, {failed} failed.", "", "## Promotion", ""]
    if promotion:
        lines += [f"- {p['challenger'][:12]}: {'promoted to champion' if p['promoted'] else 'not promoted'} "
                  f"({p['reason']})" for p in promotion]
    else:
        lines.append("No new model to decide.")
    return "\n".join(lines)


def publish_summary(data: list[dict], runs: list[dict], evaluated: int, failed: int, promotion: list[dict]) -> str:
    body = summary_markdown(data, runs, evaluated, failed, promotion)
    get_run_logger().info("%s", body.split("\n", 2)[-1][:2000])
    create_markdown_artifact(body, key=SUMMARY_ARTIFACT, description="what this pipeline run did")
    return body
