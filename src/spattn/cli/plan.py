"""``spattn plan``: a pattern per layer and head under a budget, written as JSON (deploy with spattn.patched)."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Any

import typer


def _ints(text: str | None, name: str) -> tuple[int, ...]:
    if not text:
        return ()
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise typer.BadParameter(f"{name} must be comma-separated integers, got {text!r}") from None


def load_model(name: str, device: str) -> tuple[Any, Any]:
    """``(model, tokenizer)``: ``"smollm2"``, ``"minilm"`` (offline) or a Hugging Face model folder (a causal
    LM when its config says so, else an encoder)."""
    if name == "smollm2":
        from spattn.integrations.models import load_smollm2

        return load_smollm2(device=device)
    if name == "minilm":
        from spattn.integrations.models import load_minilm

        return load_minilm(device=device)
    path = Path(name)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"unknown model {name!r}: give 'smollm2', 'minilm' or a Hugging Face model folder "
                                "(with config.json)")
    from spattn._optional import require

    transformers = require("transformers", extra="hf")
    config = transformers.AutoConfig.from_pretrained(str(path))
    causal = any(a.endswith("ForCausalLM") for a in (getattr(config, "architectures", None) or []))
    auto = transformers.AutoModelForCausalLM if causal else transformers.AutoModel
    model = auto.from_pretrained(str(path)).to(device).eval()
    return model, transformers.AutoTokenizer.from_pretrained(str(path))


class RetrievalScorer:
    """``--task retrieval``: pass-key retrieval, scored by the mean log-likelihood of the answer tokens.

    ``samples`` pass keys (``spattn.eval.tasks.passkey``) hidden at depths ``(n + 0.5) / samples`` of
    ``haystack`` (text or token ids ``[T]``: pass the calibration split, so that held-out text stays out of
    planning) at ``length`` tokens. ``score(model, plan)`` is the mean over samples of the mean log-probability
    of the answer's tokens after the prompt (teacher forced, one forward per sample): unlike exact match it
    moves before the answer flips, so one sparse layer's effect on retrieval is visible with a few samples
    (the planner's layer sensitivity). ``accuracy(model, plan)`` gives the exact match per sample, and
    ``per_sample`` both from the same forwards.
    """

    name = "retrieval"

    def __init__(self, tokenizer: Any, haystack: Any, length: int, samples: int, *, block_size: int = 64,
                 seed: int = 0) -> None:
        try:
            from spattn.eval.tasks import passkey
        except ImportError as exc:
            raise ValueError(f"--task retrieval needs the evaluation suite (spattn.eval.tasks.passkey), which this "
                             f"install lacks: {exc}") from None
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
            raise ValueError(f"samples must be a positive int, got {samples!r}")
        self.tokenizer = tokenizer
        self.block_size = block_size
        depths = [(n + 0.5) / samples for n in range(samples)]
        self.samples = [passkey(tokenizer, haystack, length, depth, seed=seed + n) for n, depth in enumerate(depths)]

    def per_sample(self, model: Any, plan: Any) -> tuple[list[float], list[bool]]:
        """Per sample, in one forward each: the mean log-probability of the answer tokens, and exact match
        (the argmax at every answer position is the answer's next token, as in
        ``spattn.eval.retrieval.retrieval_accuracy``). Dense when ``plan`` is None."""
        import torch
        import torch.nn.functional as F

        from spattn.integrations.hf import patched
        from spattn.planner.tasks import block_size_of

        device = next(model.parameters()).device
        likelihoods, correct = [], []
        with torch.no_grad(), patched(model, plan, block_size=block_size_of(plan, self.block_size)):
            for s in self.samples:
                ids = torch.cat([s.input_ids[0], s.answer_ids[:-1]])[None].to(device)
                logits = model(input_ids=ids).logits[0, s.input_ids.shape[1] - 1 :].float()
                answer = s.answer_ids.to(device)
                likelihoods.append(float(F.log_softmax(logits, -1).gather(-1, answer[:, None]).mean()))
                correct.append(bool((logits.argmax(-1) == answer).all()))
        return likelihoods, correct

    def score(self, model: Any, plan: Any) -> float:
        values = self.per_sample(model, plan)[0]
        return sum(values) / len(values)

    def accuracy(self, model: Any, plan: Any) -> list[bool]:
        """Exact match (greedy decoding emits the answer) per sample."""
        return self.per_sample(model, plan)[1]


def plan_command(
    model: str = typer.Option("smollm2", help="'smollm2', 'minilm' or a Hugging Face model folder."),
    text: str = typer.Option("austen", "--text", help="Calibration corpus ('austen', 'kjv') or a text file."),
    budget: str = typer.Option(..., "--budget", help="0.2 or '20%' (of the dense cost), '256 keys' (per query), "
                               "or '12ms' (attention per forward; --cost latency)."),
    cost: str = typer.Option("flops", help="'flops' (visited tiles) or 'latency' (measured table, cached)."),
    objective: str = typer.Option("recall", help="'recall', 'kl', 'output_error' or 'task' (with --task)."),
    task: str | None = typer.Option(None, help="Task profile: 'lm', 'classification' or 'retrieval'."),
    lengths: str = typer.Option("1024", help="Comma-separated calibration lengths (the budget rule is stated at "
                                "the first)."),
    samples: int = typer.Option(3, help="Calibration chunks per length."),
    block_size: int = typer.Option(64, help="Block size of the layouts and of the cost model."),
    dense_layers: str | None = typer.Option(None, help="Layers kept dense, e.g. '0,-1' (first and last)."),
    min_dense_heads: int = typer.Option(0, help="At least this many heads stay dense."),
    families: str | None = typer.Option(None, help="Restrict the candidate families (comma-separated)."),
    solver: str = typer.Option("auto", help="'auto' (milp with scipy, else dp), 'dp' or 'milp'."),
    validate_lengths: str | None = typer.Option(None, help="Also measure the plan at these lengths (held-out "
                                                "chunks), e.g. '4096,8192'."),
    validate_text: str | None = typer.Option(None, help="Also measure the plan on this text (domain shift)."),
    heatmap: str | None = typer.Option(None, help="Write the layer x head heat map to this PNG file."),
    device: str = typer.Option("auto", help="'auto' (CUDA when present), 'cpu' or 'cuda'."),
    output: str = typer.Option("plan.json", "--output", "-o", help="Where to write the plan JSON."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
) -> None:
    """Choose a sparse pattern per layer and head under a FLOP, key or latency budget, and write it as JSON.

    Captures queries and keys on calibration chunks, scores every candidate (windows, sinks + window, strided
    and random reach, Budgeted, dynamic TopK per selector, dense) in every head, costs it, and solves a
    multiple-choice knapsack. Deploy: spattn.patched(model, spattn.Plan.load(path), block_size=...).
    """
    import torch
    from rich.console import Console
    from rich.table import Table

    from spattn._optional import MissingExtraError
    from spattn.planner import Constraints, make_plan
    from spattn.planner.validate import validate

    console = Console(stderr=True)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        net, tokenizer = load_model(model, device)
        scorer: Any = task
        calib_lengths = _ints(lengths, "--lengths")
        if task == "retrieval":  # pass keys in the calibration split after the captured chunks
            from spattn.planner.calibrate import calibration_chunks

            L0 = calib_lengths[0]
            haystack = calibration_chunks(text, tokenizer, L0, samples + 2)[samples:].flatten()
            scorer = RetrievalScorer(tokenizer, haystack, L0, max(2, samples), block_size=block_size)
        constraints = Constraints(dense_layers=_ints(dense_layers, "--dense-layers"), min_dense_heads=min_dense_heads,
                                  families=None if not families else tuple(f.strip() for f in families.split(",")))
        result = make_plan(net, text, budget=budget, cost=cost, objective=objective, task=scorer,
                           lengths=calib_lengths, device=device, tokenizer=tokenizer, samples=samples,
                           block_size=block_size, constraints=constraints, solver=solver, progress=not quiet)
        plan = result.plan
        plan.meta["command"] = " ".join(shlex.quote(a) for a in ["spattn", *sys.argv[1:]])
        plan.meta["model"] = model
        plan.meta["text"] = text
        plan.meta["front"] = result.front
        checks = []
        for L in _ints(validate_lengths, "--validate-lengths"):
            checks.append({"text": text, **validate(net, plan, text, length=L, tokenizer=tokenizer)})
        if validate_text:
            checks.append({"text": validate_text, **validate(net, plan, validate_text, length=calib_lengths[0],
                                                              tokenizer=tokenizer, split="calibration")})
        if checks:
            plan.meta["validation"] = [{k: v for k, v in c.items() if k != "per_head_recall"} for c in checks]
        plan.save(output)
        if heatmap:
            from spattn.planner.figures import plan_heatmap

            plan_heatmap(plan, heatmap)
    except (FileNotFoundError, MissingExtraError, ValueError, TypeError) as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None
    info = plan.meta["planner"]
    table = Table(title=f"spattn plan: {plan.budget}")
    table.add_column("layer", justify="right")
    table.add_column("choices per head")
    for layer, rows in plan.heads.items():
        table.add_row(str(layer), "  ".join(r["choice"] for r in rows))
    console.print(table)
    uniform = info.get("uniform")
    console.print(f"cost {info['total_cost']:.4g} of capacity {info['capacity']:.4g}; mean recall "
                  f"{info['mean_recall']:.4f}; keys per query {info['mean_keys_per_query']:.1f}; tiles "
                  f"{info['mean_tile_fraction']:.3f} of dense; solver {info['solver']}; "
                  f"{info['seconds']['total']:.1f} s")
    if uniform:
        console.print(f"best uniform pattern within the budget: {uniform['choice']} (mean recall "
                      f"{uniform['recall']:.4f}, cost {uniform['cost']:.4g})")
    for c in plan.meta.get("validation", []):
        console.print(f"validation {c['text']} at {c['length']} tokens: recall {c['recall']:.4f}, keys per query "
                      f"{c['keys_per_query']:.1f}, tiles {c['tile_fraction']:.3f} of dense")
    console.print(f"wrote {output}; deploy: spattn.patched(model, spattn.Plan.load({json.dumps(output)}), "
                  f"block_size={plan.budget.block_size})")
