"""``spattn eval``: the evaluation suite on any pattern or plan, with intervals, JSON and PNG figures.

``spattn eval passkey|variable-tracking|multi-needle`` (a real model, dense vs plans),
``spattn eval mqar|listops`` (small models trained from scratch), ``spattn eval ablate`` (one factor varied).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

eval_app = typer.Typer(
    help="Evaluation suite: retrieval in real text, synthetic tasks trained from scratch, ablations.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

PlanOption = Annotated[
    list[str] | None,
    typer.Option("--plan", "-p", help="A plan to compare with dense (repeatable): 'sinks=64,window=256', "
                 "a plan JSON file, or pattern/plan JSON text. Dense is always evaluated first."),
]
OutputOption = Annotated[str | None, typer.Option("--output", "-o", help="Output folder (default spattn-eval/TASK).")]
SeedsOption = Annotated[str, typer.Option("--seeds", help="Seeds: a count ('3' = 0,1,2) or a list ('0,5,9').")]


def _ints(text: str, name: str) -> list[int]:
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise typer.BadParameter(f"{name} must be comma-separated integers, got {text!r}") from None
    if not out:
        raise typer.BadParameter(f"{name} must list at least one value")
    return out


def _floats(text: str, name: str) -> list[float]:
    try:
        out = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise typer.BadParameter(f"{name} must be comma-separated numbers, got {text!r}") from None
    if not out:
        raise typer.BadParameter(f"{name} must list at least one value")
    return out


def _seeds(text: str) -> list[int]:
    values = _ints(text, "--seeds")
    if len(values) == 1 and "," not in text:
        if values[0] < 1:
            raise typer.BadParameter("--seeds as a count must be >= 1")
        return list(range(values[0]))
    return values


def _plans(specs: list[str] | None) -> dict[str, Any]:
    from spattn.eval.lm import parse_plan

    plans: dict[str, Any] = {"dense": None}
    for spec in specs or []:
        try:
            plan = parse_plan(spec)
        except (ValueError, FileNotFoundError, KeyError, TypeError) as exc:
            raise typer.BadParameter(str(exc), param_hint="--plan") from None
        name = Path(spec).stem if spec.endswith(".json") else spec
        plans[name if not plan.is_dense() else "dense (spattn)"] = plan
    return plans


def _record(task: str, extra: dict[str, Any]) -> dict[str, Any]:
    import spattn
    from spattn.bench.env import machine_info

    versions = {"spattn": spattn.__version__}
    for name in ("torch", "transformers", "scipy", "numpy"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            versions[name] = None
    machine = machine_info()
    return {"task": task, "machine": machine, "versions": versions, "commit": machine.get("git_commit"),
            "command": machine.get("command"), **extra}


def _write(folder: Path, record: dict[str, Any]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "results.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def _load_model(model: str, device: str) -> tuple[Any, Any]:
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if model == "smollm2":
        from spattn.integrations.models import load_smollm2

        return load_smollm2(device=device)
    path = Path(model).expanduser()
    if not path.is_dir():
        raise typer.BadParameter(f"model must be 'smollm2' or a Hugging Face model folder, got {model!r}",
                                 param_hint="--model")
    from spattn._optional import require

    transformers = require("transformers", extra="hf")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(path)).to(device).eval()
    return loaded, transformers.AutoTokenizer.from_pretrained(str(path))


def _haystack(text: str) -> str:
    from spattn.data.corpora import load_text

    try:
        return load_text(text)
    except (FileNotFoundError, ValueError, KeyError) as exc:
        raise typer.BadParameter(str(exc), param_hint="--text") from None


def _console():
    from rich.console import Console

    return Console(stderr=True)


_VERDICT = {"a": "better", "b": "worse", "tie": "tie"}


def _print_retrieval(record: dict[str, Any]) -> None:
    from rich.table import Table

    table = Table(title=f"{record['task']}: exact match (95% bootstrap interval), {record['samples']} samples")
    for column in ("plan", "found", "accuracy", "vs dense"):
        table.add_column(column)
    for name, entry in record["result"]["plans"].items():
        a = entry["accuracy"]
        versus = entry.get("versus_dense")
        verdict = "" if versus is None else (
            f"{_VERDICT[versus['winner']]} ({versus['difference']:+.2f} [{versus['low']:+.2f}, {versus['high']:+.2f}])"
        )
        table.add_row(name, f"{entry['found']}/{entry['samples']}",
                      f"{a['value']:.3f} [{a['low']:.3f}, {a['high']:.3f}]", verdict)
    _console().print(table)


def _retrieval(task: str, model: str, plans: list[str] | None, lengths: str, depths: str, seeds: str, text: str,
               output: str | None, backend: str, block_size: int, device: str, batch_size: int, figures: bool,
               options: dict[str, Any]) -> dict[str, Any]:
    from spattn.eval.figures import heatmap_figure
    from spattn.eval.retrieval import make_samples, retrieval_grid

    chosen = _plans(plans)
    length_list, depth_list, seed_list = _ints(lengths, "--lengths"), _floats(depths, "--depths"), _seeds(seeds)
    if any(not 0 <= d <= 1 for d in depth_list):
        raise typer.BadParameter("depths must be in [0, 1]", param_hint="--depths")
    console = _console()
    with console.status(f"loading {model} and the {text} text..."):
        loaded, tokenizer = _load_model(model, device)
        haystack = _haystack(text)
    try:
        samples = make_samples(task, tokenizer, haystack, length_list, depth_list, seed_list, **options)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    result = retrieval_grid(loaded, tokenizer, samples, chosen, backend=backend, block_size=block_size,
                            batch_size=batch_size, progress=True)
    record = _record(task, {
        "model": model, "text": text, "lengths": length_list, "depths": depth_list, "seeds": seed_list,
        "options": options, "backend": backend, "block_size": block_size, "samples": len(samples), "result": result,
    })
    folder = Path(output or f"spattn-eval/{task}")
    if figures:
        panels = {name: entry["cells"] for name, entry in result["plans"].items()}
        record["figures"] = [str(heatmap_figure(panels, folder / "heatmap.png",
                                                title=f"{task} on {text}, {model}"))]
    path = _write(folder, record)
    _print_retrieval(record)
    console.print(f"results: {path}")
    return record


FigureOption = Annotated[bool, typer.Option("--figures/--no-figures", help="Write PNG figures (needs spattn[viz]).")]
DeviceOption = Annotated[str, typer.Option(help="'auto', 'cpu' or 'cuda'.")]


@eval_app.command("passkey")
def passkey_command(
    model: Annotated[str, typer.Option(help="'smollm2' (SmolLM2-135M, offline) or a Hugging Face model folder.")]
    = "smollm2",
    plan: PlanOption = None,
    lengths: Annotated[str, typer.Option(help="Context lengths in tokens, comma-separated.")] = "1024,2048",
    depths: Annotated[str, typer.Option(help="Relative needle depths in [0, 1], comma-separated.")] = "0.1,0.5,0.9",
    seeds: SeedsOption = "3",
    text: Annotated[str, typer.Option(help="Haystack: 'austen', 'kjv' or a text file (domain shift).")] = "austen",
    distractors: Annotated[int, typer.Option(help="Look-alike needles for other keys.")] = 0,
    noise: Annotated[float, typer.Option(help="Fraction of haystack tokens replaced by random tokens.")] = 0.0,
    answer: Annotated[str, typer.Option(help="'digits' (5-digit number) or 'rare' (rare word tokens).")] = "digits",
    output: OutputOption = None,
    backend: Annotated[str, typer.Option(help="spattn backend of the plans.")] = "auto",
    block_size: Annotated[int, typer.Option(help="Block size of the compiled layouts.")] = 128,
    device: DeviceOption = "auto",
    batch_size: Annotated[int, typer.Option(help="Samples of one length per forward pass.")] = 1,
    figures: FigureOption = True,
) -> None:
    """A pass key hidden in real text at each length x depth x seed: exact match, dense vs every plan."""
    _retrieval("passkey", model, plan, lengths, depths, seeds, text, output, backend, block_size, device,
               batch_size, figures, {"distractors": distractors, "noise": noise, "answer": answer})


@eval_app.command("variable-tracking")
def variable_tracking_command(
    model: Annotated[str, typer.Option(help="'smollm2' or a Hugging Face model folder.")] = "smollm2",
    plan: PlanOption = None,
    lengths: Annotated[str, typer.Option(help="Context lengths in tokens, comma-separated.")] = "1024,2048",
    depths: Annotated[str, typer.Option(help="Relative depth of the chain's first statement.")] = "0.1,0.5",
    seeds: SeedsOption = "3",
    text: Annotated[str, typer.Option(help="Haystack: 'austen', 'kjv' or a text file.")] = "austen",
    hops: Annotated[int, typer.Option(help="Assignments to follow after the first.")] = 1,
    chains: Annotated[int, typer.Option(help="Chains in the prompt (the others are distractors).")] = 1,
    noise: Annotated[float, typer.Option(help="Fraction of haystack tokens replaced by random tokens.")] = 0.0,
    output: OutputOption = None,
    backend: Annotated[str, typer.Option(help="spattn backend of the plans.")] = "auto",
    block_size: Annotated[int, typer.Option(help="Block size of the compiled layouts.")] = 128,
    device: DeviceOption = "auto",
    batch_size: Annotated[int, typer.Option(help="Samples of one length per forward pass.")] = 1,
    figures: FigureOption = True,
) -> None:
    """RULER-style variable chains in real text: the value of the last variable, dense vs every plan."""
    _retrieval("variable_tracking", model, plan, lengths, depths, seeds, text, output, backend, block_size, device,
               batch_size, figures, {"hops": hops, "chains": chains, "noise": noise})


@eval_app.command("multi-needle")
def multi_needle_command(
    model: Annotated[str, typer.Option(help="'smollm2' or a Hugging Face model folder.")] = "smollm2",
    plan: PlanOption = None,
    lengths: Annotated[str, typer.Option(help="Context lengths in tokens, comma-separated.")] = "1024,2048",
    depths: Annotated[str, typer.Option(help="Centre depths; three parts at depth-0.1, depth, depth+0.1.")]
    = "0.2,0.5,0.8",
    seeds: SeedsOption = "3",
    text: Annotated[str, typer.Option(help="Haystack: 'austen', 'kjv' or a text file.")] = "austen",
    noise: Annotated[float, typer.Option(help="Fraction of haystack tokens replaced by random tokens.")] = 0.0,
    output: OutputOption = None,
    backend: Annotated[str, typer.Option(help="spattn backend of the plans.")] = "auto",
    block_size: Annotated[int, typer.Option(help="Block size of the compiled layouts.")] = 128,
    device: DeviceOption = "auto",
    batch_size: Annotated[int, typer.Option(help="Samples of one length per forward pass.")] = 1,
    figures: FigureOption = True,
) -> None:
    """Three parts of a pass key at three depths, all asked for: exact match, dense vs every plan."""
    _retrieval("multi_needle", model, plan, lengths, depths, seeds, text, output, backend, block_size, device,
               batch_size, figures, {"noise": noise})


def _task_config(task: str, size: str, d_model: int | None, length: int | None, changes: dict[str, Any],
                 task_options: dict[str, Any] | None = None):
    """The preset of ``task`` at ``size`` with ``changes``; ``length``: MQAR's ``seq_len`` / ListOps'
    ``max_length`` (ListOps' ``min_length`` lowered to half of it when the preset's is larger);
    ``task_options``: further generator arguments (MQAR's ``prefix_length``)."""
    from spattn.eval.train import listops_config, mqar_config

    try:
        make = mqar_config if task == "mqar" else listops_config
        config = make(size, **({"d_model": d_model} if d_model else {}), **changes)
        options = {**config.task_options, **(task_options or {})}
        if length is not None:
            if task == "mqar":
                options["seq_len"] = length
            else:
                options["max_length"] = length
                options["min_length"] = min(int(options.get("min_length", 500)), length // 2)
        config = config.replace(task_options=options)
        if task == "mqar":  # the generator's own checks, before any training
            from spattn.eval.tasks import mqar

            mqar(1, **config.task_options)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    return config


def _trained(task: str, plans: list[str] | None, size: str, d_model: int | None, learning_rates: str, seeds: str,
             steps: int | None, device: str, backend: str | None, block_size: int | None, output: str | None,
             figures: bool, lengths: str | None = None, learned_blocks: int = 0, learned_window: int = 0,
             task_options: dict[str, Any] | None = None) -> dict[str, Any]:
    import torch
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from spattn.eval import stats
    from spattn.eval.figures import bars_figure
    from spattn.eval.train import Learned, sweep

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    changes: dict[str, Any] = {"device": device, "backend": backend or ("auto" if device.startswith("cuda")
                                                                          else "reference")}
    if steps is not None:
        changes["steps"] = steps
    if block_size is not None:
        changes["block_size"] = block_size
    length_list: list[int | None] = [None] if lengths is None else list(_ints(lengths, "--lengths"))
    configs = [_task_config(task, size, d_model, length, changes, task_options) for length in length_list]
    chosen = _plans(plans)
    if learned_blocks < 0 or learned_window < 0:
        raise typer.BadParameter("--learned-blocks and --learned-window must be >= 0")
    if learned_blocks:
        from spattn.patterns import Window

        safeguard = None if not learned_window else (Window(learned_window) if task == "mqar"
                                                     else Window(learned_window, learned_window))
        chosen[f"learned={learned_blocks}" + (f",window={learned_window}" if learned_window else "")] = Learned(
            learned_blocks, safeguard=safeguard)
    rates, seed_list = _floats(learning_rates, "--learning-rates"), _seeds(seeds)
    runs_total = len(chosen) * len(rates) * len(seed_list) * len(configs)
    console = _console()
    folder = Path(output or f"spattn-eval/{task}")
    by_length: dict[str, Any] = {}
    figure_paths: list[str] = []
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as bar:
        overall = bar.add_task(f"{task}: {runs_total} runs", total=sum(runs_total // len(configs) * c.steps
                                                                        for c in configs))
        for config in configs:
            length = int(config.task_options.get("seq_len" if task == "mqar" else "max_length", 0))
            results: dict[str, Any] = {}
            for name, plan in chosen.items():
                bar.update(overall, description=f"{task} {length}: {name}")
                results[name] = sweep(config, plan, learning_rates=rates, seeds=seed_list,
                                      progress=lambda step, loss: bar.advance(overall))
            baseline = results["dense"].best_runs()
            record_plans: dict[str, Any] = {}
            for name, result in results.items():
                entry = result.to_dict()
                if name != "dense":  # paired over the same test examples, seed by seed (pooled)
                    a = [x for r in result.best_runs() for x in r.per_example]
                    b = [x for r in baseline for x in r.per_example]
                    entry["versus_dense"] = stats.compare(a, b).to_dict()
                record_plans[name] = entry
            by_length[str(length)] = {"length": length, "config": config.to_dict(), "plans": record_plans}
            if figures:
                name = "accuracy.png" if len(configs) == 1 else f"accuracy-{length}.png"
                figure_paths.append(str(bars_figure({n: e["accuracy"] for n, e in record_plans.items()},
                                                    folder / name, title=f"{task} ({size}, {length} tokens), "
                                                    "best learning rate")))
    extra: dict[str, Any] = {"size": size, "config": configs[0].to_dict(), "learning_rates": rates,
                             "seeds": seed_list, "lengths": [int(k) for k in by_length], "by_length": by_length}
    if len(configs) == 1:
        extra["plans"] = next(iter(by_length.values()))["plans"]
    record = _record(task, extra)
    if figures:
        record["figures"] = figure_paths
    path = _write(folder, record)
    from rich.table import Table

    table = Table(title=f"{task} ({size}): test accuracy, best of {len(rates)} learning rates, {len(seed_list)} seeds")
    for column in ("length", "plan", "accuracy [95% interval]", "best lr", "vs dense"):
        table.add_column(column)
    for length, block in by_length.items():
        for name, entry in block["plans"].items():
            a, versus = entry["accuracy"], entry.get("versus_dense")
            verdict = "" if versus is None else _VERDICT[versus["winner"]]
            table.add_row(length, name, f"{a['value']:.3f} [{a['low']:.3f}, {a['high']:.3f}]",
                          f"{entry['best_learning_rate']:g}", verdict)
    console.print(table)
    console.print(f"results: {path}")
    return record


LengthsOption = Annotated[str | None, typer.Option(
    "--lengths", help="Sequence lengths, comma-separated: one training per length (MQAR: seq_len; ListOps: "
    "max_length). Default: the preset's.")]
LearnedBlocksOption = Annotated[int, typer.Option(
    help="Also train learned attention (spattn.learned.LearnedTopK): routed key blocks per query block "
    "(0 = off).")]
LearnedWindowOption = Annotated[int, typer.Option(
    help="Window the learned router always keeps (its safeguard; 0 = none).")]
StepsOption = Annotated[int | None, typer.Option(help="Training steps (default: the preset's).")]
TrainBackendOption = Annotated[str | None, typer.Option(
    help="spattn backend (default: reference on CPU, auto on CUDA).")]
TrainBlockOption = Annotated[int | None, typer.Option(help="Block size of layouts and of selection.")]


@eval_app.command("mqar")
def mqar_command(
    plan: PlanOption = None,
    size: Annotated[str, typer.Option(help="'tiny' (CPU, seconds) or 'published' (Zoology: 256 tokens, 16 pairs).")]
    = "tiny",
    d_model: Annotated[int | None, typer.Option(help="Model width (published: 64 or 128).")] = None,
    learning_rates: Annotated[str, typer.Option(help="Learning rates to try; the best is kept.")] = "0.003",
    seeds: SeedsOption = "1",
    steps: StepsOption = None,
    device: DeviceOption = "auto",
    backend: TrainBackendOption = None,
    block_size: TrainBlockOption = None,
    output: OutputOption = None,
    figures: FigureOption = True,
    lengths: LengthsOption = None,
    learned_blocks: LearnedBlocksOption = 0,
    learned_window: LearnedWindowOption = 0,
    prefix_length: Annotated[int, typer.Option(help="Random filler tokens before the key-value pairs (default 0: "
                                               "Zoology's layout, where sinks over the first tokens see every pair).")]
    = 0,
) -> None:
    """Multi-query associative recall, a small model trained from scratch per plan: test accuracy."""
    _trained("mqar", plan, size, d_model, learning_rates, seeds, steps, device, backend, block_size, output, figures,
             lengths, learned_blocks, learned_window,
             task_options={"prefix_length": prefix_length} if prefix_length else None)


@eval_app.command("listops")
def listops_command(
    plan: PlanOption = None,
    size: Annotated[str, typer.Option(help="'tiny' (CPU, seconds) or 'published' (LRA: 4 layers, 512 wide).")]
    = "tiny",
    d_model: Annotated[int | None, typer.Option(help="Model width.")] = None,
    learning_rates: Annotated[str, typer.Option(help="Learning rates to try; the best is kept.")] = "0.001",
    seeds: SeedsOption = "1",
    steps: StepsOption = None,
    device: DeviceOption = "auto",
    backend: TrainBackendOption = None,
    block_size: TrainBlockOption = None,
    output: OutputOption = None,
    figures: FigureOption = True,
    lengths: LengthsOption = None,
    learned_blocks: LearnedBlocksOption = 0,
    learned_window: LearnedWindowOption = 0,
) -> None:
    """ListOps (LRA), a small classifier trained from scratch per plan: test accuracy."""
    _trained("listops", plan, size, d_model, learning_rates, seeds, steps, device, backend, block_size, output,
             figures, lengths, learned_blocks, learned_window)


SYNTHETIC = ("mqar", "listops")


@eval_app.command("ablate")
def ablate_command(
    factor: Annotated[str, typer.Option(help="window, sinks, selector, budget, block_size or dense_layers.")],
    values: Annotated[str, typer.Option(help="Values, comma-separated (dense_layers: '0+1,none'; sinks: on/off).")],
    task: Annotated[str, typer.Option(help="passkey, variable_tracking, multi_needle (a real model) or mqar, "
                                           "listops (a small model trained from scratch per variant).")] = "passkey",
    window: Annotated[int, typer.Option(help="Base window.")] = 256,
    sinks: Annotated[int, typer.Option(help="Base sinks (0 = off).")] = 64,
    selector: Annotated[str, typer.Option(help="Base selector of the dynamic part.")] = "pooled",
    budget: Annotated[int, typer.Option(help="Base keys per query of the dynamic part (0 = none).")] = 0,
    block_size: Annotated[int, typer.Option(help="Base block size.")] = 128,
    dense_layers: Annotated[str, typer.Option(help="Base layers kept dense ('0+1' or 'none').")] = "none",
    model: Annotated[str, typer.Option(help="'smollm2' or a Hugging Face model folder.")] = "smollm2",
    lengths: Annotated[str | None, typer.Option(help="Context lengths in tokens (default 1024; mqar/listops: one "
                                                     "length, the sequence length, default the preset's).")] = None,
    depths: Annotated[str, typer.Option(help="Relative needle depths.")] = "0.1,0.5,0.9",
    seeds: SeedsOption = "3",
    text: Annotated[str, typer.Option(help="Haystack: 'austen', 'kjv' or a text file.")] = "austen",
    size: Annotated[str, typer.Option(help="mqar/listops preset: 'tiny' or 'published'.")] = "tiny",
    steps: Annotated[int | None, typer.Option(help="mqar/listops training steps (default: the preset's).")] = None,
    learning_rate: Annotated[float | None, typer.Option(help="mqar/listops learning rate (default: the "
                                                            "preset's).")] = None,
    output: OutputOption = None,
    backend: Annotated[str, typer.Option(help="spattn backend.")] = "auto",
    device: DeviceOption = "auto",
    figures: FigureOption = True,
) -> None:
    """Vary one factor of a plan with the rest fixed; every variant scored on the same examples (retrieval: exact
    match with a real model; mqar/listops: test accuracy of a model trained from scratch per variant, pooled over
    the seeds); a table and a figure."""
    from rich.markdown import Markdown

    from spattn.eval import ablate as ablation
    from spattn.eval.figures import ablation_figure

    try:
        parsed = [ablation.parse_value(factor, v) for v in values.split(",")]
        base = ablation.PlanSpec(window=window, sinks=sinks, selector=selector, budget=budget, block_size=block_size,
                                 dense_layers=ablation.parse_value("dense_layers", dense_layers))
        ablation.variants(factor, parsed, base)
    except (ValueError, TypeError) as exc:
        raise typer.BadParameter(str(exc)) from None
    console = _console()
    extra: dict[str, Any]
    if task in SYNTHETIC:
        score, dense_estimate, extra = _synthetic_scorer(task, size, lengths, steps,
                                                         learning_rate, _seeds(seeds), device, backend)
    else:
        from spattn.eval.retrieval import make_samples, retrieval_accuracy

        with console.status(f"loading {model} and the {text} text..."):
            loaded, tokenizer = _load_model(model, device)
            haystack = _haystack(text)
        samples = make_samples(task, tokenizer, haystack, _ints(lengths or "1024", "--lengths"),
                               _floats(depths, "--depths"), _seeds(seeds))

        def score(spec: ablation.PlanSpec) -> list[float]:
            result = retrieval_accuracy(loaded, tokenizer, samples, spec.plan(), backend, block_size=spec.block_size,
                                        progress=True)
            return [float(c) for c in result.correct]

        dense_estimate = retrieval_accuracy(loaded, tokenizer, samples, None, progress=True).accuracy
        extra = {"model": model, "text": text, "samples": len(samples)}
    result = ablation.ablate(factor, parsed, score, base=base,
                             progress=lambda spec: console.print(f"scoring {spec.label()}"))
    record = _record("ablate", {"ablated_task": task, **extra, "dense": dense_estimate.to_dict(), "ablation": result,
                                "table": ablation.table(result)})
    folder = Path(output or f"spattn-eval/ablate-{factor}")
    if figures:
        ylabel = f"{task} test accuracy" if task in SYNTHETIC else f"{task} exact match"
        record["figures"] = [str(ablation_figure(result, folder / "ablation.png", ylabel=ylabel))]
    path = _write(folder, record)
    console.print(Markdown(ablation.table(result)))
    console.print(f"dense: {dense_estimate}; results: {path}")


def _synthetic_scorer(task: str, size: str, length: str | None, steps: int | None, learning_rate: float | None,
                      seeds: list[int], device: str, backend: str):
    """``(score(spec) -> per-example accuracies pooled over seeds, dense estimate, record fields)`` for an
    ablation on MQAR / ListOps: one model trained from scratch per variant and seed, the same test sets."""
    import torch

    from spattn.eval import stats
    from spattn.eval.train import train

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    changes: dict[str, Any] = {"device": device, "backend": backend if device.startswith("cuda") else "reference"}
    if steps is not None:
        changes["steps"] = steps
    if learning_rate is not None:
        changes["learning_rate"] = learning_rate
    chosen = None if length is None else _ints(length, "--lengths")
    if chosen is not None and len(chosen) != 1:
        raise typer.BadParameter("an ablation on mqar/listops trains at one length: give one value",
                                 param_hint="--lengths")
    config = _task_config(task, size, None, None if chosen is None else chosen[0], changes)

    def score(spec) -> list[float]:
        runs = [train(config.replace(block_size=spec.block_size, seed=s), spec.plan()) for s in seeds]
        return [x for r in runs for x in r.per_example]

    dense = [x for s in seeds for x in train(config.replace(seed=s), None).per_example]
    return score, stats.estimate(dense), {"size": size, "config": config.to_dict(), "seeds": seeds}
