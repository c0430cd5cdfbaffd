"""Compare N runs item by item: the params that differ, the final metrics side by side, and the
eval items on which the runs disagree (``mlflow-tunix compare``).

The MLflow UI lines up one column of ``eval/predictions.json`` across runs, but shows no diff, no
correctness and no filter. Here the runs' eval tables are joined on the item id; items whose
correctness differs come first, and each run's flips against the first run (the baseline) are
counted both ways (right->wrong, wrong->right). The result is printed as text and logged as one
self-contained HTML page (``compare/<name>.html``, no scripts: the UI's artifact viewer shows it).
"""

from __future__ import annotations

import html
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from mlflow_tunix.errors import TunixError
from mlflow_tunix.runs import TABLE_FILE

COMPARE_DIR = "compare"
MAX_HTML_ITEMS = 5000  # an HTML page past this is too long to read; the text says how many were left out
# Params that differ between any two runs by construction: not worth a row.
_ALWAYS_DIFFERENT = ("mlflow_tunix.",)


@dataclass
class RunSide:
    run_id: str
    name: str
    params: dict
    metrics: dict
    status: str
    start_time: int
    items: dict = field(default_factory=dict)  # item id -> table row (expected, answer, correct, generated, ...)


@dataclass
class Comparison:
    runs: list[RunSide]  # runs[0] is the baseline the flips are counted against
    params: dict  # param -> [value per run] (only those that differ)
    metrics: dict  # metric -> [value per run or None]
    items: list[dict]  # one per item id: id, prompt, expected, answers, correct, generated, disagree
    flips: list[dict]  # per run after the first: {"right_to_wrong": [ids], "wrong_to_right": [ids]}
    skipped: list[str] = field(default_factory=list)  # runs without an eval table (e.g. stopped sweep trials)

    @property
    def disagreeing(self) -> list[dict]:
        return [item for item in self.items if item["disagree"]]


# --------------------------------------------------------------------------- reading the runs
def _read_side(client, run_id: str) -> RunSide:
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException as exc:
        raise TunixError(f"run {run_id}: {' '.join(str(exc).split())[:300]}") from None
    return RunSide(run_id, run.data.tags.get("mlflow.runName", run_id[:8]), dict(run.data.params),
                   dict(run.data.metrics), run.info.status, run.info.start_time or 0)


def _read_table(client, run_id: str) -> dict | None:
    """The run's eval table as {id: row}, or None when the run has none."""
    from mlflow.exceptions import MlflowException

    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = client.download_artifacts(run_id, TABLE_FILE, tmp)
        except (MlflowException, OSError):
            return None
        table = json.loads(Path(path).read_text(encoding="utf-8"))
    columns = table["columns"]
    rows = [dict(zip(columns, values)) for values in table["data"]]
    return {str(row["id"]): row for row in rows}


BEST_RUN_TAG = "mlflow_tunix.best_run"  # set on a sweep's run by sweep.py


def children(parent_run_id: str, client=None) -> list[str]:
    """The runs nested under ``parent_run_id`` (a sweep's trials): the sweep's best first (the
    baseline flips are counted against), then the others, oldest first."""
    from mlflow.tracking import MlflowClient

    client = client or MlflowClient()
    parent = _read_side(client, parent_run_id)
    parent_run = client.get_run(parent_run_id)
    experiment_id, best = parent_run.info.experiment_id, parent_run.data.tags.get(BEST_RUN_TAG)
    found = client.search_runs([experiment_id],
                               filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'",
                               order_by=["attributes.start_time ASC"], max_results=1000)
    if not found:
        raise TunixError(f"run {parent_run_id} ({parent.name}) has no nested runs")
    ids = [r.info.run_id for r in found]
    return ([best] if best in ids else []) + [i for i in ids if i != best]


def compare_runs(run_ids: list[str], client=None) -> Comparison:
    """Join the eval tables of ``run_ids`` (2 or more; runs without a table are skipped, named in
    ``skipped``) on the item id and tell where they differ."""
    from mlflow.tracking import MlflowClient

    client = client or MlflowClient()
    if len(set(run_ids)) != len(run_ids):
        raise TunixError("compare: a run is named twice")
    sides, skipped = [], []
    for run_id in run_ids:
        side = _read_side(client, run_id)
        table = _read_table(client, run_id)
        if table is None:
            skipped.append(run_id)
            continue
        side.items = table
        sides.append(side)
    if len(sides) < 2:
        raise TunixError(f"compare: need 2 or more runs with an eval table ({TABLE_FILE}); got {len(sides)}"
                         + (f" (without one: {', '.join(skipped)})" if skipped else ""))
    return Comparison(sides, _differing_params(sides), _metrics(sides), *_items(sides), skipped=skipped)


def _differing_params(sides: list[RunSide]) -> dict:
    keys = sorted(set().union(*(s.params for s in sides)))
    out = {}
    for key in keys:
        values = [s.params.get(key) for s in sides]
        if len(set(values)) > 1 and not key.startswith(_ALWAYS_DIFFERENT):
            out[key] = values
    return out


def _metrics(sides: list[RunSide]) -> dict:
    keys = sorted(set().union(*(s.metrics for s in sides)))
    # The eval figures first (what the comparison is about), then training, then system metrics.
    keys.sort(key=lambda k: (k.startswith("system/"), k not in ("answer_accuracy", "format_rate"), k))
    return {key: [s.metrics.get(key) for s in sides] for key in keys}


def _items(sides: list[RunSide]) -> tuple[list[dict], list[dict]]:
    base = sides[0]
    ids = list(base.items)  # the baseline's order; items missing from it follow
    ids += [i for s in sides[1:] for i in s.items if i not in base.items and i not in ids]
    items = []
    for item_id in ids:
        rows = [s.items.get(item_id) for s in sides]
        first = next(r for r in rows if r is not None)
        correct = [bool(r["correct"]) if r is not None else None for r in rows]
        answers = [str(r.get("answer", "")) if r is not None else None for r in rows]
        items.append({
            "id": item_id,
            "prompt": str(first.get("prompt", "")),
            "expected": str(first.get("expected", "")),
            "correct": correct,
            "answers": answers,
            "generated": [str(r.get("generated", "")) if r is not None else None for r in rows],
            "disagree": len({c for c in correct if c is not None}) > 1,
            "answers_differ": len({a for a in answers if a is not None}) > 1,
        })
    # Disagreements first, then items where only the answers differ; the baseline's order within each.
    items.sort(key=lambda it: (not it["disagree"], not it["answers_differ"]))
    flips = []
    for k in range(1, len(sides)):
        pairs = [(it["id"], it["correct"][0], it["correct"][k]) for it in items]
        flips.append({"right_to_wrong": [i for i, a, b in pairs if a is True and b is False],
                      "wrong_to_right": [i for i, a, b in pairs if a is False and b is True]})
    return items, flips


# --------------------------------------------------------------------------- text
def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def _short(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def format_text(c: Comparison, limit: int = 20, all_metrics: bool = False) -> str:
    """The comparison as plain text: runs, differing params, metrics, flips and the first ``limit``
    disagreeing items."""
    labels = [f"[{i}]" for i in range(len(c.runs))]
    out = ["runs (flips are counted against [0]):"]
    out += [f"  {label} {s.run_id}  {s.name}  ({s.status}, {len(s.items)} items)" for label, s in zip(labels, c.runs)]
    if c.skipped:
        out.append(f"  without an eval table, left out: {', '.join(c.skipped)}")
    out.append("")
    if c.params:
        out.append("params that differ:")
        out.append(_table([["param", *labels]] + [[k, *map(_fmt, v)] for k, v in c.params.items()]))
    else:
        out.append("params: all the same")
    out.append("")
    metrics = {k: v for k, v in c.metrics.items() if all_metrics or not k.startswith("system/")}
    out.append("metrics:")
    out.append(_table([["metric", *labels]] + [[k, *map(_fmt, v)] for k, v in metrics.items()]))
    out.append("")
    for k, f in enumerate(c.flips, start=1):
        out.append(f"[{k}] vs [0]: {len(f['right_to_wrong'])} right->wrong, {len(f['wrong_to_right'])} wrong->right")
    disagreeing = c.disagreeing
    out.append(f"{len(disagreeing)} of {len(c.items)} items where the runs disagree"
               + (f" (first {limit} shown)" if len(disagreeing) > limit else "") + ":")
    if disagreeing:
        rows = [["id", "expected", *(f"{label} answer" for label in labels), "prompt"]]
        for it in disagreeing[:limit]:
            marks = [("-" if a is None else f"{a} {'✓' if ok else '✗'}") for a, ok in zip(it["answers"], it["correct"])]
            rows.append([it["id"], it["expected"], *marks, _short(it["prompt"], 40)])
        out.append(_table(rows))
    return "\n".join(out)


# --------------------------------------------------------------------------- HTML
_CSS = """
body{font-family:system-ui,sans-serif;margin:1.2em;color:#222}
table{border-collapse:collapse;margin:.6em 0 1.4em}
th,td{border:1px solid #ccc;padding:3px 7px;vertical-align:top;font-size:13px}
th{background:#f3f3f3;text-align:left}
td.ok{background:#e6f4e6}td.bad{background:#fbe3e3}td.none{background:#eee}
pre{margin:0;white-space:pre-wrap;word-break:break-all;font-size:12px;max-width:40em}
.num{text-align:right;font-variant-numeric:tabular-nums}
summary{cursor:pointer;font-weight:600;margin:.6em 0}
"""


def _e(value) -> str:
    return html.escape(_fmt(value))


def _items_html(items: list[dict], n_runs: int) -> str:
    head = "<tr><th>id</th><th>prompt</th><th>expected</th>" + "".join(
        f"<th>[{i}] generated</th>" for i in range(n_runs)) + "</tr>"
    body = []
    for it in items:
        cells = []
        for text, ok in zip(it["generated"], it["correct"]):
            cls = "none" if ok is None else ("ok" if ok else "bad")
            mark = "" if ok is None else ("✓ " if ok else "✗ ")
            cells.append(f'<td class="{cls}">{mark}<pre>{html.escape(text or "")}</pre></td>')
        body.append(f"<tr><td>{html.escape(it['id'])}</td><td><pre>{html.escape(it['prompt'])}</pre></td>"
                    f"<td>{html.escape(it['expected'])}</td>{''.join(cells)}</tr>")
    return f"<table>{head}{''.join(body)}</table>"


def format_html(c: Comparison, title: str = "mlflow-tunix compare") -> str:
    """One self-contained page (inline CSS, no scripts): what the MLflow artifact viewer shows."""
    n = len(c.runs)
    labels = "".join(f"<th>[{i}]</th>" for i in range(n))
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{_CSS}</style></head><body><h2>{html.escape(title)}</h2>"]
    parts.append("<table><tr><th></th><th>run</th><th>name</th><th>status</th><th>items</th></tr>" + "".join(
        f"<tr><td>[{i}]</td><td><code>{s.run_id}</code></td><td>{html.escape(s.name)}</td><td>{s.status}</td>"
        f"<td class='num'>{len(s.items)}</td></tr>" for i, s in enumerate(c.runs)) + "</table>")
    if c.skipped:
        parts.append(f"<p>Without an eval table, left out: {html.escape(', '.join(c.skipped))}</p>")
    parts.append("<h3>Params that differ</h3>")
    parts.append("<p>none</p>" if not c.params else f"<table><tr><th>param</th>{labels}</tr>" + "".join(
        f"<tr><td>{html.escape(k)}</td>" + "".join(f"<td>{_e(v)}</td>" for v in values) + "</tr>"
        for k, values in c.params.items()) + "</table>")
    parts.append(f"<h3>Metrics</h3><table><tr><th>metric</th>{labels}</tr>" + "".join(
        f"<tr><td>{html.escape(k)}</td>" + "".join(f"<td class='num'>{_e(v)}</td>" for v in values) + "</tr>"
        for k, values in c.metrics.items() if not k.startswith("system/")) + "</table>")
    parts.append("<h3>Flips against [0]</h3><table><tr><th>run</th><th>right→wrong</th><th>wrong→right</th></tr>"
                 + "".join(f"<tr><td>[{k}]</td><td class='num'>{len(f['right_to_wrong'])}</td>"
                           f"<td class='num'>{len(f['wrong_to_right'])}</td></tr>"
                           for k, f in enumerate(c.flips, start=1)) + "</table>")
    disagreeing = c.disagreeing[:MAX_HTML_ITEMS]
    agreeing = [it for it in c.items if not it["disagree"]][: max(0, MAX_HTML_ITEMS - len(disagreeing))]
    parts.append(f"<h3>{len(c.disagreeing)} of {len(c.items)} items where the runs disagree</h3>")
    if disagreeing:
        parts.append(_items_html(disagreeing, n))
    if agreeing:
        parts.append(f"<details><summary>{len(agreeing)} items where they agree</summary>"
                     f"{_items_html(agreeing, n)}</details>")
    if len(c.items) > len(disagreeing) + len(agreeing):
        parts.append(f"<p>{len(c.items) - len(disagreeing) - len(agreeing)} more items left out of this page.</p>")
    parts.append("</body></html>")
    return "".join(parts)


def log_html(c: Comparison, run_id: str | None = None, client=None) -> tuple[str, str]:
    """Log the HTML page to ``run_id`` (default: the newest compared run); return (run id, artifact path)."""
    from mlflow.tracking import MlflowClient

    client = client or MlflowClient()
    target = run_id or max(c.runs, key=lambda s: s.start_time).run_id
    path = f"{COMPARE_DIR}/compare-{'-'.join(s.run_id[:8] for s in c.runs[:6])}.html"
    client.log_text(target, format_html(c, title=f"compare {len(c.runs)} runs"), path)
    return target, path
