"""The planner: a pattern per layer and head, chosen under a FLOP, key or latency budget, per task.

* :func:`plan` / :func:`make_plan` — calibrate, score every candidate per head, solve the knapsack -> Plan
  (``make_plan`` also returns the evidence: the candidate table, per-head costs and scores, the best uniform
  pattern at the same budget, the Pareto front).
* :mod:`~spattn.planner.candidates` — the options per head; :mod:`~spattn.planner.score` — many layouts scored
  in one pass; :mod:`~spattn.planner.cost` — the cached latency table; :mod:`~spattn.planner.solve` — the
  multiple-choice knapsack (exact DP and ``scipy.optimize.milp``); :mod:`~spattn.planner.tasks` — task
  profiles (scorers); :mod:`~spattn.planner.validate` — a plan's recall and cost on other lengths and texts;
  :mod:`~spattn.planner.figures` — the per-layer x per-head heat map.
"""

from spattn.integrations.plan import BudgetRule
from spattn.planner.api import COSTS, OBJECTIVES, Constraints, PlanResult, make_plan, parse_budget, plan
from spattn.planner.candidates import FAMILIES, Candidate, default_candidates
from spattn.planner.cost import LatencyTable
from spattn.planner.score import LayoutScores, score_layouts
from spattn.planner.solve import InfeasibleBudget, Solution, solve, sweep
from spattn.planner.table import CandidateTable, build_table
from spattn.planner.tasks import EmbeddingScorer, LMScorer, TaskScorer, layer_sensitivity

__all__ = [
    "BudgetRule", "COSTS", "Candidate", "CandidateTable", "Constraints", "EmbeddingScorer", "FAMILIES",
    "InfeasibleBudget",
    "LMScorer", "LatencyTable", "LayoutScores", "OBJECTIVES", "PlanResult", "Solution", "TaskScorer",
    "build_table", "default_candidates", "layer_sensitivity", "make_plan", "parse_budget", "plan",
    "score_layouts", "solve", "sweep",
]
