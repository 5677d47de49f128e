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


def render_html(results: dict[str, Any], folder: Path) -> str:
    """The report page; every number shown is read from ``results`` (formatted, never computed here)."""
    import jinja2

    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    template = env.from_string(Path(__file__).with_name("template.html").read_text())
    by_id = {c["id"]: c for c in results["candidates"]}
    recs = [{"budget": x["budget"], "c": by_id.get(x["candidate"]), "reason": x["reason"],
             "same": [by_id[i] for i in x.get("same_as", []) if i in by_id]} for x in results["recommendations"]]
    figures = []
    for name, rel in results["figures"].items():
        data = base64.b64encode((folder / rel).read_bytes()).decode()
        figures.append({"data": data, "caption": FIGURES[name][2]})
    table = sorted(results["candidates"], key=lambda c: (c["budget"], c["model"]["perplexity"], c["id"]))
    view = dict(results)
    view["data"] = dict(results["data"], text_name=results["data"]["text"])
    return template.render(
        r=view, recs=recs, figures=figures, table=table, f=_f, pct=_pct, sgn=_sgn,
        rec_ids={x["candidate"] for x in results["recommendations"] if x["candidate"]},
        front_ppl=set(results["frontier"]["perplexity"]), front_recall=set(results["frontier"]["recall"]),
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
