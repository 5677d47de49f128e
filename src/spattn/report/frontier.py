"""Pareto frontiers (cost against model damage, cost against recall) and the recommendation per budget."""

from __future__ import annotations

from typing import Any


def pareto(points: list[tuple[str, float, float]], *, maximize: bool = False) -> list[str]:
    """Ids of the non-dominated points ``(id, cost, value)``: lower cost and lower value (higher when
    ``maximize``) are better. Returned in order of increasing cost."""
    sign = -1.0 if maximize else 1.0
    ordered = sorted(points, key=lambda p: (p[1], sign * p[2], p[0]))
    out: list[str] = []
    best = float("inf")
    for pid, _, value in ordered:
        v = sign * value
        if v < best:
            out.append(pid)
            best = v
    return out


def _same_numbers(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Two candidates that compiled to the same layouts (same cost, recall and perplexity)."""
    return (a["cost"]["keys_fraction"] == b["cost"]["keys_fraction"]
            and a["cost"]["block_fraction"] == b["cost"]["block_fraction"]
            and a["recall"]["mean"] == b["recall"]["mean"]
            and _selection(a)["perplexity"] == _selection(b)["perplexity"])


def _selection(c: dict[str, Any]) -> dict[str, Any]:
    return c["model"]["splits"]["selection"]


def _selection_key(c: dict[str, Any]) -> tuple:
    return (_selection(c)["perplexity"], -c["recall"]["mean"], c["cost"]["keys_fraction"], c["id"])


def _runner_up(ok: list[dict[str, Any]], pick: dict[str, Any]) -> dict[str, Any] | None:
    """The best candidate (on the selection split) of another family at the same budget."""
    others = [c for c in ok if c["family"] != pick["family"] or c.get("selector") != pick.get("selector")]
    others = [c for c in others if not _same_numbers(c, pick)]
    return min(others, key=_selection_key) if others else None


def _choose(ok: list[dict[str, Any]]) -> tuple[dict, list[dict], dict, dict | None]:
    """(best on the selection split, the candidates tied with it, the pick: the cheapest of those, runner-up)."""
    from spattn.report.intervals import paired_difference

    best = min(ok, key=_selection_key)
    tied = [c for c in ok if c is best or paired_difference(
        _selection(c)["segments_sums"], _selection(best)["segments_sums"])["tie"]]
    pick = min(tied, key=lambda c: (c["cost"]["keys_fraction"], _selection_key(c)))
    return best, tied, pick, _runner_up(ok, pick)


def contenders(candidates: list[dict[str, Any]], budgets: list[float]) -> set[str]:
    """Ids of the candidates :func:`recommend` can name (the best, the candidates tied with it, the runner-up)
    or compare on the report split, decided on the selection split alone: only these need the report split."""
    out: set[str] = set()
    for b in budgets:
        ok = [c for c in candidates if c["cost"]["keys_fraction"] <= b]
        if ok:
            _, tied, _, runner = _choose(ok)
            out |= {c["id"] for c in tied} | ({runner["id"]} if runner is not None else set())
    return out


def recommend(candidates: list[dict[str, Any]], budgets: list[float]) -> list[dict[str, Any]]:
    """Per budget, pick among the candidates whose measured cost is within the budget.

    The pick is made on the *selection* split, never on the chunks the report scores: the lowest selection
    perplexity wins, and every candidate tied with it (paired bootstrap of the per-token log-likelihood
    difference, interval containing 0) competes on cost: the cheapest of the tied candidates is recommended.
    The numbers shown for it come from the separate report split."""
    from spattn.report.intervals import paired_difference

    out = []
    for b in budgets:
        ok = [c for c in candidates if c["cost"]["keys_fraction"] <= b]
        if not ok:
            out.append({"budget": b, "candidate": None,
                        "reason": "no candidate's measured cost is within this budget"})
            continue
        best, tied, pick, runner = _choose(ok)
        reason = "lowest perplexity on the selection split among the candidates within the budget"
        if pick is not best:
            reason = (f"tied on the selection split with the lowest-perplexity candidate ({best['label']}) and "
                      "cheaper: the cheapest of the tied candidates")
        rec = {"budget": b, "candidate": pick["id"], "reason": reason, "best_on_selection": best["id"],
               "tied_with": [c["id"] for c in tied if c is not pick],
               "same_as": [c["id"] for c in ok if c is not pick and _same_numbers(c, pick)],
               "runner_up": None if runner is None else runner["id"]}
        if runner is not None:
            diff = paired_difference(pick["model"]["splits"]["report"]["segments_sums"],
                                     runner["model"]["splits"]["report"]["segments_sums"])
            rec["against_runner_up"] = {"nll_difference": diff["difference"], "interval": diff["interval"],
                                        "verdict": "tie" if diff["tie"] else
                                        ("better" if diff["difference"] < 0 else "worse")}
        out.append(rec)
    return out


def carry_over(candidates: list[dict[str, Any]], recommendations: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The candidates measured again at longer lengths: each budget's pick and its runner-up."""
    by_id = {c["id"]: c for c in candidates}
    ids: list[str] = []
    for rec in recommendations:
        for cid in (rec.get("candidate"), rec.get("runner_up")):
            if cid is not None and cid not in ids:
                ids.append(cid)
    return [by_id[i] for i in ids if i in by_id]


def holds(recommendations: list[dict[str, Any]], main: dict[str, Any], others: list[dict[str, Any]]) -> None:
    """Say, for each recommendation, at which lengths it holds: its family, fitted to the same budget rule at that
    length, stays within the budget and is not beaten beyond the interval by the runner-up (report split).
    A pick not measured at a length for lack of time gets ``holds: None`` there (unknown, not "does not hold")."""
    from spattn.report.intervals import paired_difference

    for rec in recommendations:
        if rec["candidate"] is None:
            rec["holds_at"], rec["lengths"] = [], []
            continue
        rec["holds_at"] = [main["length"]]
        rec["lengths"] = [{"length": main["length"], "holds": True, "note": "picked here"}]
        for other in others:
            by_id = {c["id"]: c for c in other["candidates"]}
            pick, runner = by_id.get(rec["candidate"]), by_id.get(rec.get("runner_up"))
            entry: dict[str, Any] = {"length": other["length"]}
            timed_out = any(s["id"] == rec["candidate"] and s.get("out_of_time") for s in other.get("skipped", []))
            if pick is None and timed_out:  # not measured: says nothing about whether it holds
                entry |= {"holds": None, "note": "not measured here: the run's --time-budget was spent"}
            elif pick is None:
                entry |= {"holds": False, "note": "the family cannot be fitted to this budget at this length"}
            elif not pick["within_budget"]:
                entry |= {"holds": False, "note": "its measured cost exceeds the budget at this length"}
            elif runner is None:
                entry |= {"holds": True, "note": "within budget; no runner-up to compare with"}
            else:
                diff = paired_difference(pick["model"]["splits"]["report"]["segments_sums"],
                                         runner["model"]["splits"]["report"]["segments_sums"])
                worse = not diff["tie"] and diff["difference"] > 0
                entry |= {"holds": not worse, "nll_difference": diff["difference"], "interval": diff["interval"],
                          "note": (f"the runner-up {runner['label']} is better here" if worse else
                                   "tied with the runner-up" if diff["tie"] else "better than the runner-up")}
            rec["lengths"].append(entry)
            if entry["holds"]:
                rec["holds_at"].append(other["length"])


def task_profiles(rec: dict[str, Any], retrieval: dict[str, Any]) -> dict[str, Any]:
    """The recommendation of one budget per task profile (Note [task profiles]).

    ``language_modelling``: the pick (selection-split perplexity, ties to the cheaper). ``retrieval``: the
    runner-up when it retrieves significantly better than the pick on the same pass keys (paired bootstrap), else
    the pick; none when neither retrieves a pass key that dense finds (``none_retrieves``). ``agree`` says whether
    the two profiles name the same pattern; ``evidence`` whether the retrieval profile rests on anything: dense
    itself must retrieve (otherwise the task cannot separate the candidates)."""
    # Note [task profiles]: language modelling (perplexity, KL, agreement on held-out text) and retrieval (pass
    # keys placed at depths 0.1 / 0.5 / 0.9 of the text) can disagree: a pattern that keeps the recent context
    # wins perplexity while one that reaches further back retrieves. The report names one pattern per profile and
    # says when they differ; it never silently averages the two.
    # Note [no candidate retrieves]: when dense finds pass keys and the profile's candidate finds none, a "tie"
    # between pick and runner-up (both 0) must not read as "the pick serves retrieval": the profile then names no
    # pattern for retrieval (``retrieval.candidate`` is None, ``none_retrieves`` True) and says why.
    dense = retrieval["dense"]["accuracy"]
    lm = rec["candidate"]
    other = rec.get("for_retrieval", lm)
    pick, chosen = retrieval.get(lm), retrieval.get(other)
    none = dense > 0 and chosen is not None and chosen["accuracy"] == 0  # Note [no candidate retrieves]
    if dense == 0:
        evidence, why = False, "dense retrieves none of the pass keys here: retrieval cannot separate the candidates"
    elif none:
        evidence, why = True, (f"neither the pick nor the runner-up retrieves a pass key (dense {100 * dense:.0f}%): "
                               "no measured candidate at this budget serves retrieval; use a larger budget or dense")
    elif other != lm:
        evidence, why = True, ("the runner-up retrieves significantly more pass keys than the language-modelling pick "
                               "(paired bootstrap on the same samples)")
    elif rec.get("retrieval", {}).get("against_runner_up") == "tie":
        evidence, why = True, "the pick and the runner-up retrieve alike (a tie): the pick serves both profiles"
    else:
        evidence, why = True, "the pick retrieves at least as well as the runner-up"
    return {"language_modelling": {"candidate": lm, "why": "lowest selection-split perplexity (ties: the cheaper)"},
            "retrieval": {"candidate": None if none else other, "why": why, "none_retrieves": none, "accuracy": None if chosen is None else chosen["accuracy"],
                          "language_modelling_accuracy": None if pick is None else pick["accuracy"],
                          "dense_accuracy": dense},
            "agree": other == lm and not none, "evidence": evidence}

