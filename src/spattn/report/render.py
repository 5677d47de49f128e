"""Write results.json, the PNG figures and a self-contained report.html (figures embedded as base64)."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

from spattn.report.figures import FIGURES, write_figures

SCHEMA_PATH = Path(__file__).with_name("schema.json")


def _f(x: Any, digits: int) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def _pct(x: Any) -> str:
    return "—" if x is None else f"{100 * x:.1f}%"


def _sgn(x: Any, digits: int) -> str:
    return "—" if x is None else f"{x:+.{digits}f}"


def _threads_view(threads: dict[str, Any] | None) -> tuple[list[dict[str, Any]], float, list[dict[str, Any]]]:
    """Token spans (text, shade, hover text) of the threads section, the mean dropped share, the worst layers."""
    if not threads:
        return [], 0.0, []
    tokens = threads["tokens"]
    spans = []
    for i, text in enumerate(tokens):
        share = threads["dropped"][i]
        lost = [f"{tokens[j]!r} (position {j}, {100 * m:.1f}%)"
                for j, m in zip(threads["lost_keys"][i], threads["lost_mass"][i], strict=True) if m > 0]
        title = f"drops {100 * share:.1f}% of its attention" + (": " + "; ".join(lost) if lost else "")
        spans.append({"text": text, "alpha": f"{min(1.0, share):.3f}", "title": title})
    layers = [{"layer": i, "drop": sum(row) / len(row)} for i, row in enumerate(threads["per_layer_head"])]
    worst = sorted(layers, key=lambda x: -x["drop"])[:3]
    return spans, sum(threads["dropped"]) / max(1, len(threads["dropped"])), worst


def render_html(results: dict[str, Any], folder: Path) -> str:
    """The report page; every number shown is read from ``results`` (formatted, never computed here)."""
    import jinja2

    from spattn.report.summary import COLUMNS

    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    template = env.from_string(Path(__file__).with_name("template.html").read_text())
    by_id = {c["id"]: c for c in results["candidates"]}
    recs = [{"budget": x["budget"], "c": by_id.get(x["candidate"]), "reason": x["reason"], "x": x,
             "same": [by_id[i] for i in x.get("same_as", []) if i in by_id],
             "tied": [by_id[i] for i in x.get("tied_with", []) if i in by_id],
             "runner": by_id.get(x.get("runner_up"))} for x in results["recommendations"]]
    figures = []
    for name, rel in results["figures"].items():
        data = base64.b64encode((folder / rel).read_bytes()).decode()
        figures.append({"data": data, "caption": FIGURES[name][2]})
    table = sorted(results["candidates"], key=lambda c: (c["budget"], c["model"]["perplexity"], c["id"]))
    view = dict(results)
    view["data"] = dict(results["data"], text_name=results["data"]["text"])
    spans, mean_drop, worst = _threads_view(results.get("threads"))
    return template.render(
        r=view, recs=recs, figures=figures, table=table, f=_f, pct=_pct, sgn=_sgn, columns=COLUMNS,
        rec_ids={x["candidate"] for x in results["recommendations"] if x["candidate"]},
        front_ppl=set(results["frontier"]["perplexity"]), front_recall=set(results["frontier"]["recall"]),
        threads_tokens=spans, threads_mean=mean_drop, threads_layers=worst,
    )


def validate(results: dict[str, Any]) -> None:
    """Check ``results`` against schema.json (when jsonschema is installed)."""
    try:
        import jsonschema
    except ImportError:  # the dev extra; the report itself does not need it
        return
    jsonschema.validate(results, json.loads(SCHEMA_PATH.read_text()))


def write_outputs(results: dict[str, Any], folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    results["figures"] = write_figures(results, folder / "figures")
    validate(results)
    (folder / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (folder / "report.html").write_text(render_html(results, folder), encoding="utf-8")
