"""Small transformers trained from scratch on the synthetic tasks, with any spattn pattern or plan inside.

* :class:`TinyTransformer`: token + learned position embeddings, ``layers`` pre-norm blocks whose attention
  runs through :func:`spattn.attention` with the plan's pattern for that layer (``None`` = full), an optional
  MLP, and a head: next-token logits (MQAR) or classes from the mean over non-padding tokens (ListOps).
* :class:`TrainConfig`: one training run; presets :func:`mqar_config` (Zoology's 2 layers, one head, no MLP)
  and :func:`listops_config` (LRA's 4 layers, 512 wide, 8 heads), each with a ``tiny`` CI size.
* :func:`train`: one run -> :class:`TrainResult` (per-example test accuracy with its bootstrap interval).
* :func:`sweep`: a few learning rates x seeds; the best learning rate by mean accuracy, its accuracy with a
  two-level (seeds, then examples) interval.
* :class:`Learned`: in place of a plan, a learned block router (:class:`spattn.learned.LearnedTopK`) in every
  layer, trained with the model (straight-through top-k, routing temperature annealed over the run).

Everything is deterministic by seed on CPU. The attention of every layer, dense included, goes through
``spattn.attention`` on the same backend, so dense and sparse differ only by the pattern.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from spattn.eval import stats
from spattn.eval.tasks import IGNORE_INDEX, LISTOPS_VOCAB, listops, mqar
from spattn.integrations.plan import Plan, as_plan
from spattn.layout import tables
from spattn.layout.layout import Layout
from spattn.learned.router import LearnedTopK
from spattn.learned.schedule import Schedule
from spattn.learned.train import Regularisers, regulariser_losses, routers, selection_metrics
from spattn.ops.attention.api import attention
from spattn.patterns import Full, Hierarchical, Pattern, compile
from spattn.selectors import LayoutBuilder

TASKS = ("mqar", "listops")
TIME_CHECK_STEP = 25  # train(time_limit=): the step at which the run's length is projected
PRECISIONS = ("float32", "bfloat16")


@dataclass(frozen=True)
class TrainConfig:
    """One training run on a synthetic task.

    Attributes:
        task: ``"mqar"`` (next-token recall, causal) or ``"listops"`` (classification, bidirectional).
        task_options: arguments of :func:`~spattn.eval.tasks.mqar` / :func:`~spattn.eval.tasks.listops`
            (``seq_len``, ``num_kv_pairs``, ``vocab_size`` / ``min_length``, ``max_length``, ``max_depth``...).
        d_model, layers, heads: model width, depth and attention heads (``d_model % heads == 0``).
        mlp: add a 4x GELU MLP to every block (``False``: attention only, as Zoology's MQAR models).
        train_examples, test_examples: sizes of the generated sets (test uses another seed).
        steps, batch_size, learning_rate, weight_decay, warmup: AdamW with linear warmup (``warmup`` fraction
            of the steps) then cosine decay to 0.
        block_size: block size of the compiled layouts (and of dynamic selection).
        backend: spattn backend (``"reference"`` on CPU; ``"auto"`` picks triton on CUDA).
        device: where to train.
        seed: seeds the data, the initialisation and the batch order.
        precision: ``"float32"`` (default) or ``"bfloat16"`` (autocast of the forward pass on ``device``;
            parameters and optimiser state stay float32).
        init_std: ``None`` (default: PyTorch's module initialisation) or the standard deviation of a normal
            initialisation of every linear and embedding weight, the attention output projections scaled by
            ``1 / sqrt(2 * layers)`` (GPT-2's and Zoology's ``0.02``).
        tie_embeddings: next-token models only: the output head shares the token embedding (Zoology's MQAR
            models; default ``False``).
        clip_grad: gradient norm clipping (default ``1.0``; ``None``: no clipping, as Zoology).
        cuda_graph: on CUDA, record the whole training step (forward, backward, clipping, AdamW) in a CUDA
            graph and replay it (default ``True``); a plan that cannot be recorded trains eagerly and the
            result says why (:attr:`TrainResult.graph`). Ignored on CPU.
    """

    task: str = "mqar"
    task_options: dict[str, Any] = field(default_factory=dict)
    d_model: int = 64
    layers: int = 2
    heads: int = 1
    mlp: bool = False
    train_examples: int = 20_000
    test_examples: int = 1000
    steps: int = 1000
    batch_size: int = 64
    learning_rate: float = 1e-3
    weight_decay: float = 0.1
    warmup: float = 0.1
    block_size: int = 64
    backend: str = "reference"
    device: str = "cpu"
    seed: int = 0
    precision: str = "float32"
    init_std: float | None = None
    tie_embeddings: bool = False
    clip_grad: float | None = 1.0
    cuda_graph: bool = True

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        for name in ("d_model", "layers", "heads", "train_examples", "test_examples", "steps", "batch_size",
                     "block_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"TrainConfig.{name} must be a positive int, got {value!r}")
        if self.d_model % self.heads:
            raise ValueError(f"TrainConfig.d_model ({self.d_model}) must be a multiple of heads ({self.heads})")
        if not self.learning_rate > 0:
            raise ValueError(f"TrainConfig.learning_rate must be > 0, got {self.learning_rate!r}")
        if not 0 <= self.warmup < 1:
            raise ValueError(f"TrainConfig.warmup must be a fraction in [0, 1), got {self.warmup!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"TrainConfig.precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.init_std is not None and not self.init_std > 0:
            raise ValueError(f"TrainConfig.init_std must be None or > 0, got {self.init_std!r}")
        if self.clip_grad is not None and not self.clip_grad > 0:
            raise ValueError(f"TrainConfig.clip_grad must be None or > 0, got {self.clip_grad!r}")
        if self.tie_embeddings and self.task != "mqar":
            raise ValueError("TrainConfig.tie_embeddings needs a next-token task (mqar), got task "
                             f"{self.task!r}")
        object.__setattr__(self, "task_options", dict(self.task_options))

    def autocast(self) -> Any:
        """The context the forward passes run in: bfloat16 autocast on ``device`` or nothing."""
        return torch.autocast(torch.device(self.device).type, dtype=torch.bfloat16,
                              enabled=self.precision == "bfloat16")

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Learned:
    """Learned attention for :class:`TinyTransformer`: a :class:`~spattn.learned.LearnedTopK` router in every
    layer, trained with the model from scratch (pass it where a plan goes: ``train(config, Learned(1, ...))``).

    Per query block the model attends the ``safeguard`` (static, always kept), the ``local`` key blocks ending
    at the query block, and the ``blocks`` key blocks the router ranks highest among the rest. The routing
    temperature is annealed from ``temperature_start`` to ``temperature_end`` (exponential schedule over the
    run, as ``spattn train``).

    Attributes:
        blocks: routed key blocks per query block (>= 0).
        safeguard: a static pattern kept whole (default ``None``), e.g. ``Window(32)``.
        local: local key blocks always kept (default 0).
        scorer: ``"gate"`` (default; SeerAttention's pooled features, own parameters) or ``"pooled"`` (MoBA).
        training: ``"straight_through"`` (default) or ``"distill"``.
        hidden: gate width (default 32).
        temperature_start, temperature_end: routing softmax temperature schedule (defaults 1.0 -> 0.1).

    Padding (ListOps): the router cannot exclude padded keys, so the model holds padded positions at zero
    before every block: padded keys and values are one constant vector that carries no content.

    Example:
        >>> result = train(mqar_config("tiny"), Learned(1, safeguard=Window(8)))  # doctest: +SKIP
    """

    blocks: int
    safeguard: Pattern | None = None
    local: int = 0
    scorer: str = "gate"
    training: str = "straight_through"
    hidden: int = 32
    temperature_start: float = 1.0
    temperature_end: float = 0.1

    def __post_init__(self) -> None:
        if isinstance(self.blocks, bool) or not isinstance(self.blocks, int) or self.blocks < 0:
            raise ValueError(f"Learned.blocks must be an int >= 0, got {self.blocks!r}")
        if not (self.temperature_start > 0 and self.temperature_end > 0):
            raise ValueError("Learned.temperature_start and temperature_end must be > 0")

    def build(self, heads: int, head_dim: int, block_size: int, backend: str) -> LearnedTopK:
        """One layer's router."""
        return LearnedTopK(heads, heads, head_dim, blocks=self.blocks, block_size=block_size,
                           safeguard=self.safeguard, local=self.local, scorer=self.scorer, hidden=self.hidden,
                           training=self.training, temperature=self.temperature_start, backend=backend)

    def schedule(self, steps: int) -> Schedule:
        return Schedule(self.temperature_start, self.temperature_end, steps, shape="exponential")

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["safeguard"] = None if self.safeguard is None else self.safeguard.to_dict()
        return {"learned": out}


def mqar_config(size: str = "published", d_model: int | None = None, **changes: Any) -> TrainConfig:
    """MQAR training presets.

    ``"published"``: Zoology's setting, sequences of 256 with 16 key-value pairs, vocabulary 8192, 2 layers,
    one head, no MLP, learned positions, ``d_model`` 64 (default) or 128 (100 000 training examples, 3000
    test), Zoology's normal(0, 0.02) initialisation (its tied head is not used: on a reduced task it learned
    more slowly, ``benchmarks/results/cpu/eval/mqar-recipe``). ``"tiny"``: 24 tokens, 3 pairs, vocabulary 32,
    width 32, seconds on a CPU (CI). ``changes`` override fields."""
    if size == "published":
        config = TrainConfig(
            task="mqar", task_options={"seq_len": 256, "num_kv_pairs": 16, "vocab_size": 8192},
            d_model=d_model or 64,
            layers=2, heads=1, mlp=False, train_examples=100_000, test_examples=3000, steps=3000, batch_size=256,
            learning_rate=1e-3, block_size=32, init_std=0.02,
        )
    elif size == "tiny":
        config = TrainConfig(
            task="mqar", task_options={"seq_len": 24, "num_kv_pairs": 3, "vocab_size": 32}, d_model=d_model or 32,
            layers=2, heads=1, mlp=False, train_examples=2000, test_examples=200, steps=150, batch_size=32,
            learning_rate=1e-2, block_size=16,
        )
    else:
        raise ValueError(f"size must be 'published' or 'tiny', got {size!r}")
    return config.replace(**changes)


def listops_config(size: str = "published", **changes: Any) -> TrainConfig:
    """ListOps training presets.

    ``"published"``: LRA's model, 4 layers, 512 wide, 8 heads, MLP, sequences of 500-2000 tokens
    (``max_depth=10``, ``max_args=10``). ``"tiny"``: 1 layer, 32 wide, 10-60 tokens, seconds on a CPU (CI)."""
    if size == "published":
        config = TrainConfig(
            task="listops",
            task_options={"min_length": 500, "max_length": 2000, "max_depth": 10, "max_args": 10},
            d_model=512, layers=4, heads=8, mlp=True, train_examples=20_000, test_examples=1000, steps=2000,
            batch_size=32, learning_rate=3e-4, block_size=128,
        )
    elif size == "tiny":
        config = TrainConfig(
            task="listops", task_options={"min_length": 10, "max_length": 60, "max_depth": 3, "max_args": 4},
            d_model=32, layers=1, heads=2, mlp=True, train_examples=400, test_examples=100, steps=30,
            batch_size=32, learning_rate=1e-3, block_size=16,
        )
    else:
        raise ValueError(f"size must be 'published' or 'tiny', got {size!r}")
    return config.replace(**changes)


def _data(config: TrainConfig, examples: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    options = tuple(sorted(config.task_options.items()))
    return _generated(config.task, options, examples, seed)


@functools.lru_cache(maxsize=8)
def _generated(task: str, options: tuple, examples: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The generated set, kept for the next run of a sweep (every plan trains on the same data)."""
    make = mqar if task == "mqar" else listops
    return make(examples, seed=seed, **dict(options))


def _vocab_and_length(config: TrainConfig) -> tuple[int, int]:
    options = config.task_options
    if config.task == "mqar":
        return int(options.get("vocab_size", 8192)), int(options.get("seq_len", 256))
    return len(LISTOPS_VOCAB), _round_up(int(options.get("max_length", 2000)), config.block_size)


# ---------------------------------------------------------------------------------------------- the model
class _Block(nn.Module):
    def __init__(self, d_model: int, heads: int, mlp: bool, pattern: nn.Module | None = None) -> None:
        super().__init__()
        self.heads = heads
        self.pattern = pattern  # a parametrised pattern (LearnedTopK) or None
        self.norm = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)
        self.mlp = (
            nn.Sequential(nn.LayerNorm(d_model), nn.Linear(d_model, 4 * d_model), nn.GELU(),
                          nn.Linear(4 * d_model, d_model))
            if mlp else None
        )

    def forward(self, x: torch.Tensor, attend: Callable[..., torch.Tensor]) -> torch.Tensor:
        """``attend(query, key, value) -> out``, all ``[B, H, L, d_model // heads]``."""
        B, L, d = x.shape
        q, k, v = self.qkv(self.norm(x)).view(B, L, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = attend(q, k, v)
        x = x + self.out(y.transpose(1, 2).reshape(B, L, d))
        if self.mlp is not None:
            x = x + self.mlp(x)
        return x


@dataclass
class _PadTables:
    """What :func:`_without_padding` needs of one Layout's mask table, made once per table: the masks with every
    key cut ``c = 1 .. bs - 1`` of every stored mask and of the full block appended, and which cut masks still
    allow a pair."""

    masks: torch.Tensor  # bool [M + (M + 1) * (bs - 1), bs, bs]
    nonempty: torch.Tensor  # bool [(M + 1) * (bs - 1)]
    num_masks: int  # M

    @classmethod
    def of(cls, masks: torch.Tensor) -> _PadTables:
        M, bs = masks.shape[0], masks.shape[-1]
        stored = tables.tiles(masks)[: M + 1]  # the M masks, then the full block
        cols = torch.arange(bs, device=masks.device)
        cut = cols[None, :] < torch.arange(1, bs, device=masks.device)[:, None]  # [bs - 1, bs]: key < c
        extra = (stored[:, None] & cut[None, :, None, :]).reshape(-1, bs, bs)
        return cls(torch.cat([masks.to(torch.bool), extra]), extra.flatten(1).any(-1), M)


def _without_padding(layout: Layout, lengths: torch.Tensor, pad: _PadTables,
                     view: tuple[torch.Tensor, torch.Tensor] | None = None) -> Layout:
    """``layout`` for a right-padded batch with ``lengths [B]`` tokens each: keys at or past a row's length are
    never attended, query blocks wholly past it are empty (their rows give 0; the padded rows of the block that
    holds the last token attend the real keys: their outputs only reach padded positions, which nothing reads).
    The same pairs as ``pattern & Document(where(padding, -1, 0))`` for every real query, built on the device
    with no host synchronisation (fixed-width tables). ``view``: ``tables.unpack(layout)`` if already known."""
    bs, NQ, NK = layout.block_size, layout.num_q_blocks, layout.num_kv_blocks
    status, slot = tables.unpack(layout) if view is None else view  # [Bl, Hl, NQ, NK]
    B = lengths.shape[0]
    status = status.expand(B, status.shape[1], NQ, NK)
    n = lengths.view(B, 1, 1, 1)
    key_start = (torch.arange(NK, device=lengths.device) * bs).view(1, 1, 1, NK)
    query_start = (torch.arange(NQ, device=lengths.device) * bs).view(1, 1, NQ, 1)
    gone = (key_start >= n) | (query_start >= n)
    boundary = (key_start < n) & (n < key_start + bs) & (status != tables.EMPTY)
    M = pad.num_masks
    cut_slot = M + slot.clamp(max=M) * (bs - 1) + (n - key_start).clamp(1, bs - 1) - 1  # [B, Hl, NQ, NK]
    cut_status = torch.where(pad.nonempty[cut_slot - M], tables.PARTIAL, tables.EMPTY)
    status = torch.where(gone, tables.EMPTY, torch.where(boundary, cut_status, status)).to(torch.int8)
    mask_ids = tables.mask_ids(status, torch.where(boundary, cut_slot, slot))
    return Layout(q_len=layout.q_len, kv_len=layout.kv_len, block_size=bs, causal=layout.causal,
                  **tables.pack(status, mask_ids, pad.masks, width=NK))


class TinyTransformer(nn.Module):
    """A small transformer whose attention is a spattn plan.

    Args:
        vocab_size, max_length: token vocabulary and the longest input (learned positions).
        d_model, layers, heads, mlp: as :class:`TrainConfig`.
        plan: a :class:`~spattn.Plan`, one pattern for every layer, a :class:`Learned` router spec, or ``None``
            (full attention).
        causal: causal attention (language modelling) or bidirectional (classification).
        num_classes: ``None`` for next-token logits ``[B, L, vocab_size]``, else class logits
            ``[B, num_classes]`` from the mean over non-padding (id 0, on the right) tokens.
        backend, block_size: passed to :func:`spattn.attention`.
        init_std: ``None`` (PyTorch's initialisation) or a normal initialisation of every linear and embedding
            weight with this standard deviation, attention output projections ``/ sqrt(2 * layers)`` (GPT-2,
            Zoology); a learned router keeps its own initialisation.
        tie_embeddings: the next-token head shares the token embedding (default ``False``).

    ``forward(input_ids, positions=None)`` takes int64 ``[B, L]``; ``positions`` (int64 ``[B, P]``, optional)
    returns next-token logits ``[B, P, vocab_size]`` at those positions only (the trainer asks for the labelled
    ones: the head is most of the cost of MQAR). Every step runs without host synchronisation: static layouts
    are compiled once per length, dynamic ones come from a :class:`spattn.LayoutBuilder` cached per shape, and
    padding (classifiers) is removed on the device. Layouts are walked by their tables (``pattern=None``), so
    every plan runs the same kernels (one triton compilation for all of them).
    """

    def __init__(
        self,
        vocab_size: int,
        max_length: int,
        *,
        d_model: int = 64,
        layers: int = 2,
        heads: int = 1,
        mlp: bool = False,
        plan: Plan | Pattern | Learned | None = None,
        causal: bool = True,
        num_classes: int | None = None,
        backend: str = "reference",
        block_size: int = 64,
        init_std: float | None = None,
        tie_embeddings: bool = False,
    ) -> None:
        super().__init__()
        if tie_embeddings and num_classes is not None:
            raise ValueError("tie_embeddings needs a next-token model (num_classes=None)")
        self.learned = plan if isinstance(plan, Learned) else None
        self.plan = as_plan(None if self.learned is not None else plan)
        too_far = [i for i in self.plan.layers if i >= layers]
        if too_far:
            raise ValueError(f"plan names layer(s) {too_far} but the model has {layers} layers")
        self.causal, self.backend, self.block_size, self.num_classes = causal, backend, block_size, num_classes
        self.embed = nn.Embedding(vocab_size, d_model)
        self.position = nn.Embedding(max_length, d_model)
        self.blocks = nn.ModuleList(
            _Block(d_model, heads, mlp, self._parametrised(layer, heads, d_model // heads)) for layer in range(layers)
        )
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size if num_classes is None else num_classes, bias=False)
        if init_std is not None:
            self._initialise(init_std)
        if tie_embeddings:
            self.head.weight = self.embed.weight
        self._static: dict[tuple, tuple[Layout, tuple[torch.Tensor, torch.Tensor] | None, _PadTables | None]] = {}
        self._builders: dict[tuple, tuple[LayoutBuilder, _PadTables | None]] = {}

    def _parametrised(self, layer: int, heads: int, head_dim: int) -> nn.Module | None:
        """The parametrised pattern of a layer: a learned router, a :class:`spattn.Hierarchical` layer's
        :class:`~spattn.hierarchical.HierarchicalAttention` (learned gates and pooling), or ``None``."""
        if self.learned is not None:
            return self.learned.build(heads, head_dim, self.block_size, self.backend)
        pattern = self.plan.pattern_for(layer)
        if not isinstance(pattern, Hierarchical):
            return None
        if not self.causal:
            raise ValueError(f"layer {layer}: Hierarchical attention is causal; this model is not (classifier)")
        from spattn.hierarchical import HierarchicalAttention

        return HierarchicalAttention(pattern, heads, heads, head_dim, backend=self.backend)

    def _initialise(self, std: float) -> None:
        """Normal(0, ``std``) weights for the embeddings and every linear layer of the blocks and the head,
        zero biases, the attention output projections at ``std / sqrt(2 * layers)``; LayerNorms stay at
        (1, 0) and a learned router keeps its own initialisation."""
        own = [self.embed, self.position, self.head]
        for block in self.blocks:
            own += [block.qkv, block.out]
            if block.mlp is not None:
                own += [m for m in block.mlp if isinstance(m, nn.Linear)]
        for module in own:
            nn.init.normal_(module.weight, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        for block in self.blocks:
            nn.init.normal_(block.out.weight, std=std / math.sqrt(2 * len(self.blocks)))

    def _static_layout(self, layer: int, pattern: Pattern, length: int, device: torch.device):
        key = (layer, length, device)
        if key not in self._static:
            layout = compile(pattern, length, causal=self.causal, block_size=self.block_size,
                             heads=self.blocks[layer].heads, device=device)
            layout = dataclasses.replace(layout, pattern=None)  # walked by its tables (see the class notes)
            padded = self.num_classes is not None
            self._static[key] = (layout, tables.unpack(layout) if padded else None,
                                 _PadTables.of(layout.masks) if padded else None)
        return self._static[key]

    def _builder(self, layer: int, pattern: Pattern, batch: int, length: int, device: torch.device):
        key = (layer, batch, length, device)
        if key not in self._builders:
            builder = LayoutBuilder(pattern, length, causal=self.causal, block_size=self.block_size, batch=batch,
                                    heads=self.blocks[layer].heads, device=device)
            self._builders[key] = (builder, _PadTables.of(builder.masks) if self.num_classes is not None else None)
        return self._builders[key]

    def layout_for(self, layer: int, query: torch.Tensor, key: torch.Tensor,
                   lengths: torch.Tensor | None = None) -> Layout:
        """The Layout layer ``layer`` attends with for ``query``/``key`` ``[B, H, L, D]`` (not for a learned
        router, whose layout depends on its gate): static patterns compiled once per length, dynamic ones built
        by the cached :class:`spattn.LayoutBuilder`; with ``lengths`` (int64 ``[B]``, right padding) the padded
        keys and query blocks are removed and the dynamic part chooses among real blocks only."""
        if self.blocks[layer].pattern is not None:
            raise ValueError(f"layer {layer} is parametrised (a learned router or Hierarchical): it has no single "
                             "Layout")
        pattern = self.plan.pattern_for(layer) or Full()
        B, L = query.shape[0], query.shape[2]
        device = query.device
        if pattern.contains_dynamic():
            builder, pad = self._builder(layer, pattern, B, L, device)
            if lengths is None:
                return builder.build(query, key)
            starts = torch.arange(0, L, self.block_size, device=device)
            real = starts[None, :] < lengths[:, None]  # [B, N] blocks holding a real token
            layout = builder.build(query, key, allowed=(real[:, :, None] & real[:, None, :])[:, None])
            return _without_padding(layout, lengths, pad)
        layout, view, pad = self._static_layout(layer, pattern, L, device)
        return layout if lengths is None else _without_padding(layout, lengths, pad, view)

    def _attend(self, layer: int, lengths: torch.Tensor | None):
        """``attend(q, k, v)`` of layer ``layer`` for this batch (see :meth:`_Block.forward`)."""
        block = self.blocks[layer]
        if block.pattern is not None:  # learned router or hierarchical
            scale = 1.0 / math.sqrt(block.qkv.in_features // block.heads)
            return lambda q, k, v: block.pattern.attend(q, k, v, causal=self.causal, scale=scale)
        return lambda q, k, v: attention(q, k, v, self.layout_for(layer, q, k, lengths), causal=self.causal,
                                         backend=self.backend)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        if input_ids.dim() != 2 or input_ids.dtype != torch.long:
            raise ValueError(f"input_ids must be int64 [B, L], got {input_ids.dtype} {tuple(input_ids.shape)}")
        L = input_ids.shape[1]
        if L > self.position.num_embeddings:
            raise ValueError(f"input length {L} exceeds max_length {self.position.num_embeddings}")
        if positions is not None and (self.num_classes is not None or positions.dim() != 2
                                      or positions.shape[0] != input_ids.shape[0] or positions.dtype != torch.long):
            raise ValueError("positions must be int64 [B, P] and only for next-token models (num_classes=None), "
                             f"got {positions.dtype} {tuple(positions.shape)}")
        x = self.embed(input_ids) + self.position(torch.arange(L, device=input_ids.device))
        keep = lengths = None
        if self.num_classes is not None:  # padding: id 0 on the right
            keep = (input_ids != 0).unsqueeze(-1).to(x.dtype)
            lengths = (input_ids != 0).sum(1)
        for layer, block in enumerate(self.blocks):
            if self.learned is not None and keep is not None:
                x = x * keep  # padded positions held at zero (see Learned)
            x = block(x, self._attend(layer, lengths))
        if positions is not None:
            x = x.gather(1, positions.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        x = self.norm(x)
        if self.num_classes is None:
            return self.head(x)
        pooled = (x * keep).sum(1) / keep.sum(1).clamp_min(1)
        return self.head(pooled)


def build_model(config: TrainConfig, plan: Plan | Pattern | Learned | None) -> TinyTransformer:
    """The :class:`TinyTransformer` of a config (seeded by ``config.seed``)."""
    vocab, length = _vocab_and_length(config)
    torch.manual_seed(config.seed)
    return TinyTransformer(
        vocab, length, d_model=config.d_model, layers=config.layers, heads=config.heads, mlp=config.mlp,
        plan=plan, causal=config.task == "mqar", num_classes=10 if config.task == "listops" else None,
        backend=config.backend, block_size=config.block_size, init_std=config.init_std,
        tie_embeddings=config.tie_embeddings,
    ).to(config.device)


# ---------------------------------------------------------------------------------------------- training
@dataclass
class TrainResult:
    """One training run: test accuracy per example (MQAR: share of its queries answered; ListOps: 0/1) and
    its mean with a bootstrap interval over examples, the training loss curve (every ~10% of the steps).

    ``seconds``: the whole run (data, model, training, test); ``train_seconds``: the step loop alone (the
    device waited for); ``graph``: whether the step was recorded in a CUDA graph (``captured``, at which step,
    ``replays``, ``replay_ms``: milliseconds per replay after the first, no warm-up or JIT in it) or, if not,
    why (``reason``). ``selection``: with a :class:`Learned` plan, the routers' collapse metrics
    (:func:`spattn.learned.selection_metrics`: ``distinct_blocks``, ``usage_entropy``, ``gate_entropy``,
    ``selected_per_row``, ``expected_density``, averaged over layers) on the first test batch after training;
    empty otherwise."""

    accuracy: stats.Estimate
    per_example: list[float]
    losses: list[float]
    seconds: float
    config: dict[str, Any]
    plan: dict[str, Any]
    train_seconds: float | None = None
    graph: dict[str, Any] = field(default_factory=dict)
    selection: dict[str, float] = field(default_factory=dict)

    @property
    def ms_per_step(self) -> float | None:
        """Milliseconds per training step (the step loop over the steps run)."""
        if self.train_seconds is None:
            return None
        return 1000 * self.train_seconds / max(1, int(self.config["steps"]))

    def to_dict(self, *, per_example: bool = False) -> dict[str, Any]:
        out = {"accuracy": self.accuracy.to_dict(), "losses": self.losses, "seconds": self.seconds,
               "train_seconds": self.train_seconds, "ms_per_step": self.ms_per_step, "graph": self.graph,
               "selection": self.selection, "config": self.config, "plan": self.plan}
        if per_example:
            out["per_example"] = self.per_example
        return out


def _loss(config: TrainConfig, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    if config.task == "mqar":
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)
    return F.cross_entropy(logits, labels)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _labelled(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """MQAR: ``(positions, targets)`` int64 ``[N, P]``, the labelled positions of each row in order and their
    labels, ``P`` the most any row has (shorter rows padded with position 0 and label -100)."""
    asked = labels != IGNORE_INDEX
    P = max(1, int(asked.sum(1).max())) if labels.numel() else 1
    positions = torch.sort((~asked).to(torch.int8), dim=1, stable=True).indices[:, :P]
    return positions, labels.gather(1, positions)


class _Data:
    """A task's examples on the device, once per run: MQAR inputs with their labelled positions and targets;
    ListOps inputs padded to a multiple of the block size, and every row's length (kept on the host, so batch
    lengths are known without reading the device)."""

    def __init__(self, config: TrainConfig, inputs: torch.Tensor, labels: torch.Tensor) -> None:
        self.task = config.task
        if config.task == "mqar":
            positions, targets = _labelled(labels.to(config.device))  # the sort runs on the device
            self.positions, self.labels = positions.to(config.device), targets.to(config.device)
            self.lengths = None
        else:
            self.lengths = (inputs != 0).sum(1).tolist()
            width = _round_up(inputs.shape[1], config.block_size)
            inputs = F.pad(inputs, (0, width - inputs.shape[1]))
            self.positions, self.labels = None, labels.to(config.device)
        self.inputs = inputs.to(config.device)
        self.block_size = config.block_size

    def __len__(self) -> int:
        return self.inputs.shape[0]

    def width(self, rows: Sequence[int]) -> int:
        """ListOps: the padded length of a batch of these rows (its longest row, rounded up to a block)."""
        return _round_up(max(max(self.lengths[i] for i in rows), 1), self.block_size)

    def batch(self, index: torch.Tensor, width: int | None = None):
        """``(inputs, positions or None, labels)`` of rows ``index`` (a device tensor; no host sync)."""
        x = self.inputs[index]
        if self.task == "mqar":
            return x, self.positions[index], self.labels[index]
        return x[:, :width], None, self.labels[index]


def _batches(data: _Data, batch_size: int, steps: int, generator: torch.Generator, device: str):
    """``steps`` training batches ``(index [batch_size] on the device, width)``, all drawn before training.

    MQAR: consecutive slices of random permutations (a new one when the rest is shorter than a batch).
    ListOps: length-bucketed batches: a random permutation cut into chunks of 50 batches, each chunk sorted
    by length and cut into batches, the batches shuffled; a batch is padded to its longest row only, so
    padding (and its compute) stays small."""
    n = len(data)
    if batch_size > n:
        raise ValueError(f"TrainConfig.batch_size ({batch_size}) must be <= train_examples ({n})")
    rows: list[torch.Tensor] = []
    while len(rows) < steps:
        order = torch.randperm(n, generator=generator)
        if data.lengths is None:
            rows.extend(order[i : i + batch_size] for i in range(0, n - batch_size + 1, batch_size))
            continue
        chunk = 50 * batch_size
        epoch = []
        for start in range(0, n - batch_size + 1, chunk):
            part = order[start : start + chunk]
            by_length = part[torch.tensor([data.lengths[i] for i in part.tolist()]).argsort(stable=True)]
            epoch.extend(by_length[i : i + batch_size] for i in range(0, len(by_length) - batch_size + 1,
                                                                      batch_size))
        shuffle = torch.randperm(len(epoch), generator=generator).tolist()
        rows.extend(epoch[i] for i in shuffle)
    rows = rows[:steps]
    widths = [data.width(r.tolist()) if data.lengths is not None else None for r in rows]
    index = torch.stack(rows).to(device)
    return [(index[i], widths[i]) for i in range(steps)]


GRAPH_WARMUP = 3  # eager steps before a recording (on a side stream): triton JIT, cuBLAS workspaces, AdamW state


@dataclass
class _GraphPlan:
    """Whether a run records its training step in a CUDA graph: ``wanted`` (CUDA, MQAR, asked for) and, when the
    run trains eagerly, why (``reason``); where and how the recording went (:attr:`TrainResult.graph`)."""

    wanted: bool
    reason: str | None = None
    captured_at: int | None = None
    capture_seconds: float | None = None
    replays: int = 0
    replays_started: float | None = None  # perf_counter after the first replay
    replay_ms: float | None = None  # milliseconds per replay after the first (set by train at the end)

    @classmethod
    def of(cls, config: TrainConfig, on_cuda: bool) -> _GraphPlan:
        if not config.cuda_graph:
            return cls(False, "TrainConfig.cuda_graph is False")
        if not on_cuda:
            return cls(False, f"device {config.device!r}: CUDA graphs need a CUDA device")
        if config.task != "mqar":
            return cls(False, "ListOps batches vary in width (length buckets); recordings are made for MQAR only")
        return cls(True)

    def to_dict(self) -> dict[str, Any]:
        return {"captured": self.captured_at is not None, "reason": self.reason, "captured_at": self.captured_at,
                "capture_seconds": self.capture_seconds, "replays": self.replays, "replay_ms": self.replay_ms}


class _Stepper:
    """One training step of a run, eager or replayed from a CUDA graph.

    The step is one function (:meth:`_compute`: the batch gathered from the device-resident set by an index,
    forward, loss, backward, clipping, AdamW with its device learning rate), so both ways run the same
    operations. With a :class:`_GraphPlan` that wants a recording, the first :data:`GRAPH_WARMUP` steps run
    eagerly on a side stream, the next one is recorded with a static index buffer (the batch rows) and every
    later step copies its rows into that buffer and replays. The gradients live in the recording's memory
    (set to ``None`` before it, so its backward writes them afresh at every replay). A recording that fails
    (an operation that reads the device from the host, say) leaves the run eager and the reason in the plan."""

    def __init__(self, config: TrainConfig, model: TinyTransformer, optimizer: torch.optim.Optimizer, data: _Data,
                 layer_routers: list) -> None:
        self.config, self.model, self.optimizer, self.data = config, model, optimizer, data
        self.layer_routers = layer_routers
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_index: torch.Tensor | None = None
        self.static_loss: torch.Tensor | None = None
        self.stream: torch.cuda.Stream | None = None

    def _compute(self, index: torch.Tensor, width: int | None) -> torch.Tensor:
        x, positions, y = self.data.batch(index, width)
        with self.config.autocast():
            loss = _loss(self.config, self.model(x, positions).float(), y)
        objective = loss
        if self.layer_routers:  # the routers' own losses (distill_loss with training="distill"); no regulariser
            objective = loss + sum(regulariser_losses(self.model, Regularisers()).values(),
                                   torch.zeros((), device=loss.device))
        objective.backward()
        for router in self.layer_routers:  # its last pass would keep this step's autograd graph alive into the
            router.last = {}  # next (torch warns that a kept AccumulateGrad node can break a recording)
        if self.config.clip_grad is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.config.clip_grad)
        self.optimizer.step()
        return loss.detach()

    def eager(self, index: torch.Tensor, width: int | None) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        return self._compute(index, width)

    def step(self, step: int, index: torch.Tensor, width: int | None, plan: _GraphPlan) -> torch.Tensor:
        """Train on rows ``index``; the loss (a device scalar: a replayed step overwrites it at the next)."""
        if self.graph is not None:
            self.static_index.copy_(index)
            self.graph.replay()
            plan.replays += 1
            return self.static_loss
        if not plan.wanted or plan.reason is not None:
            return self.eager(index, width)
        if self.stream is None:
            self.stream = torch.cuda.Stream(device=index.device)
        if step < GRAPH_WARMUP:  # warm-up off the default stream, as torch.cuda.graphs asks
            self.stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.stream):
                loss = self.eager(index, width)
            torch.cuda.current_stream().wait_stream(self.stream)
            return loss
        since = time.perf_counter()
        current = torch.cuda.current_stream()
        try:
            torch.cuda.synchronize()
            self.static_index = index.clone()
            self.optimizer.zero_grad(set_to_none=True)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=self.stream):
                self.static_loss = self._compute(self.static_index, width)
            self.graph = graph
        except Exception as exc:  # noqa: BLE001 - any failure: this run trains eagerly, and says why
            torch.cuda.set_stream(current)
            self.graph = self.static_loss = self.static_index = None
            plan.reason = f"recording failed at step {step}: {type(exc).__name__}: {exc}"[:600]
            try:
                torch.cuda.synchronize()
            except Exception as again:  # noqa: BLE001
                plan.reason += f" (then: {type(again).__name__}: {again})"[:300]
            return self.eager(index, width)
        plan.captured_at = step
        plan.capture_seconds = round(time.perf_counter() - since, 3)
        self.graph.replay()  # the recording ran nothing: this replay is step ``step``
        plan.replays += 1
        torch.cuda.synchronize()  # once: the replays' pace is timed from here (see _GraphPlan.replay_ms)
        plan.replays_started = time.perf_counter()
        return self.static_loss

    def release(self) -> None:
        """Free the recording (its memory pool goes with it)."""
        self.graph = self.static_loss = self.static_index = None
        self.optimizer.zero_grad(set_to_none=True)


@torch.no_grad()
def evaluate_model(model: TinyTransformer, config: TrainConfig, inputs: torch.Tensor, labels: torch.Tensor,
                   *, batch_size: int | None = None) -> list[float]:
    """Per-example accuracy of a trained model on ``(inputs, labels)`` (see :class:`TrainResult`), in the
    order of ``inputs``. ListOps batches are length-sorted and cut to their longest row (padding does not
    change the answer, so this only saves work). One host read at the end."""
    model.eval()
    data = _Data(config, inputs, labels)
    step = batch_size or config.batch_size
    order = (torch.arange(len(data)) if data.lengths is None
             else torch.tensor(data.lengths).argsort(stable=True))
    scores = torch.empty(len(data), device=config.device)
    for start in range(0, len(data), step):
        rows = order[start : start + step]
        index = rows.to(config.device)
        x, positions, y = data.batch(index, None if data.lengths is None else data.width(rows.tolist()))
        with config.autocast():
            logits = model(x, positions)
        if config.task == "mqar":
            guess = logits.argmax(-1)
            asked = y != IGNORE_INDEX
            scores[index] = ((guess == y) & asked).sum(1).float() / asked.sum(1).clamp_min(1)
        else:
            scores[index] = (logits.argmax(-1) == y).float()
    model.train()
    return scores.cpu().tolist()


def train(config: TrainConfig, plan: Plan | Pattern | Learned | None = None, *, progress: Any = None,
          data: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
          time_limit: float | None = None) -> TrainResult:
    """Train a :class:`TinyTransformer` with ``plan`` on ``config.task`` from scratch and test it.

    Args:
        config: the run (:func:`mqar_config`, :func:`listops_config` or your own).
        plan: a :class:`~spattn.Plan`, one pattern for every layer, a :class:`Learned` router spec (trained with
            the model; the regularisers its routers ask for are added to the loss) or ``None`` (full attention).
        progress: optional ``callable(step, loss)`` called every step with the latest recorded loss (losses are
            read from the device only every ~10% of the steps: the step loop never waits for the device).
        data: optional pre-generated ``(train_inputs, train_labels, test_inputs, test_labels)`` (int64, as the
            task's generator returns them) instead of generating ``config.train_examples`` /
            ``config.test_examples`` from ``config.seed``.
        time_limit: optional seconds for the whole run. At step :data:`TIME_CHECK_STEP` (the first steps
            compile) and then every ~10% of the steps, the run's time is projected from the pace since the last
            check and, if it would not fit, ``config.steps`` is cut to what fits. A cut at the first check
            re-plans warm-up and cosine decay for the new count; a later cut makes the decay end sooner (the
            cosine is followed to the new end). The result's ``config`` holds the steps actually run.

    The data goes to the device once and every batch is drawn before the first step; MQAR's head runs at the
    labelled positions only (the same loss: the others are ignored by it). Returns a :class:`TrainResult`.

    Example:
        >>> result = train(mqar_config("tiny"), spattn.Window(8))  # doctest: +SKIP
        >>> print(result.accuracy)  # doctest: +SKIP
    """
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    started = time.perf_counter()
    learned = plan if isinstance(plan, Learned) else None
    plan = plan if learned is not None else as_plan(plan)
    if data is None:
        train_x, train_y = _data(config, config.train_examples, seed=2 * config.seed)
        test_x, test_y = _data(config, config.test_examples, seed=2 * config.seed + 1)
    else:
        if len(data) != 4:
            raise ValueError("data must be (train_inputs, train_labels, test_inputs, test_labels)")
        train_x, train_y, test_x, test_y = data
    if time_limit is not None and not time_limit > 0:
        raise ValueError(f"time_limit must be > 0 seconds, got {time_limit!r}")
    data = _Data(config, train_x, train_y)
    on_cuda = torch.device(config.device).type == "cuda"
    graph = _GraphPlan.of(config, on_cuda)
    model = build_model(config, plan)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n and "position" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n and "position" not in n)]
    # on CUDA the learning rate is a device tensor and AdamW keeps its step count on the device (capturable):
    # the same optimiser for the eager and the recorded step, so the two run the same arithmetic
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": rest, "weight_decay": 0.0}],
        lr=config.learning_rate, betas=(0.9, 0.98), fused=True if on_cuda else None, capturable=on_cuda,
    )
    if on_cuda:
        for group in optimizer.param_groups:
            group["lr"] = torch.tensor(float(config.learning_rate), device=config.device)
    total = {"steps": config.steps, "warmup": max(1, int(config.warmup * config.steps))}

    def schedule(step: int) -> float:
        """Linear warm-up then cosine decay to 0 (the factor of the base learning rate at ``step``)."""
        warmup = total["warmup"]
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total["steps"] - warmup))))

    generator = torch.Generator().manual_seed(config.seed)
    batches = _batches(data, config.batch_size, config.steps, generator, config.device)
    recorded: list[torch.Tensor] = []
    every = max(1, config.steps // 10)
    last = float("nan")
    temperature = learned.schedule(config.steps) if learned is not None else None
    layer_routers = routers(model)
    shared_temperature = None
    if layer_routers and temperature is not None:  # one device scalar for every router: a recorded step reads it
        shared_temperature = torch.tensor(float(temperature.at(0)), device=config.device)
        for router in layer_routers:
            router.temperature = shared_temperature
    model.train()
    stepper = _Stepper(config, model, optimizer, data, layer_routers)
    sync = torch.cuda.synchronize if on_cuda else (lambda: None)
    check = (0, 0.0)
    loop_started = time.perf_counter()
    for step, (index, width) in enumerate(batches):
        if step >= total["steps"]:
            break
        if time_limit is not None and (step in (5, TIME_CHECK_STEP) or (step > TIME_CHECK_STEP and step % every == 0)):
            sync()  # the run's only other host syncs: ~12 per run
            now = time.perf_counter()
            if step > 5:
                per_step = (now - check[1]) / (step - check[0])  # the pace since the last check
                reserve = per_step * (len(test_x) / config.batch_size + 10)  # evaluation, roughly
                fits = int((time_limit - (now - started) - reserve) / per_step) + step
                if fits < total["steps"]:
                    total["steps"] = max(step + 1, fits)
                    if step <= TIME_CHECK_STEP:  # the first cut re-plans warm-up, cosine and loss records
                        total["warmup"] = max(1, int(config.warmup * total["steps"]))
                        every = max(1, total["steps"] // 10)
                    config = config.replace(steps=total["steps"])
                    if learned is not None:
                        temperature = learned.schedule(total["steps"])
            check = (step, now)
        if temperature is not None:
            if shared_temperature is not None:
                shared_temperature.fill_(temperature.at(step))
            else:
                for router in layer_routers:
                    router.temperature = temperature.at(step)
        factor = schedule(step)
        for group in optimizer.param_groups:
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].fill_(config.learning_rate * factor)  # a device write: no host sync
            else:
                group["lr"] = config.learning_rate * factor
        loss = stepper.step(step, index, width, graph)
        if step % every == 0 or step == total["steps"] - 1:
            recorded.append(loss.clone())  # a recorded step overwrites its loss buffer at the next replay
            last = float(recorded[-1])  # the only host read of the loop, ~10 per run
            if not math.isfinite(last):
                raise FloatingPointError(f"training loss became {last} at step {step}: lower the learning rate")
        if progress is not None:
            progress(step, last)
    sync()
    train_seconds = time.perf_counter() - loop_started
    if graph.replays_started is not None and graph.replays > 1:  # the recorded step's own pace (no warm-up, JIT)
        graph.replay_ms = round(1000 * (time.perf_counter() - graph.replays_started) / (graph.replays - 1), 4)
    stepper.release()
    losses = torch.stack(recorded).tolist() if recorded else []
    per_example = evaluate_model(model, config, test_x, test_y)
    selection = _selection(model, config, test_x, test_y) if layer_routers else {}
    return TrainResult(
        accuracy=stats.estimate(per_example), per_example=per_example, losses=losses,
        seconds=time.perf_counter() - started, config=config.to_dict(), plan=plan.to_dict(),
        train_seconds=train_seconds, graph=graph.to_dict(), selection=selection,
    )


@torch.no_grad()
def _selection(model: TinyTransformer, config: TrainConfig, inputs: torch.Tensor, labels: torch.Tensor
               ) -> dict[str, float]:
    """The routers' collapse metrics on the first test batch (its longest row's width for ListOps)."""
    model.eval()
    data = _Data(config, inputs[: config.batch_size], labels[: config.batch_size])
    rows = list(range(len(data)))
    x, positions, _ = data.batch(torch.arange(len(data), device=config.device),
                                 None if data.lengths is None else data.width(rows))
    with config.autocast():
        model(x, positions)
    model.train()
    return {name: round(value, 6) for name, value in selection_metrics(model).items()}


@dataclass
class SweepResult:
    """Best learning rate of a sweep and its runs over seeds.

    ``accuracy``: mean over seeds of the test accuracy at the best learning rate, with a two-level bootstrap
    interval (seeds, then examples); ``by_learning_rate``: the same for every learning rate tried."""

    best_learning_rate: float
    accuracy: stats.Estimate
    by_learning_rate: dict[str, dict[str, Any]]
    runs: list[TrainResult]

    def to_dict(self) -> dict[str, Any]:
        return {"best_learning_rate": self.best_learning_rate, "accuracy": self.accuracy.to_dict(),
                "by_learning_rate": self.by_learning_rate, "runs": [r.to_dict() for r in self.runs]}

    def best_runs(self) -> list[TrainResult]:
        return [r for r in self.runs if r.config["learning_rate"] == self.best_learning_rate]


def sweep(
    config: TrainConfig,
    plan: Plan | Pattern | Learned | None = None,
    *,
    learning_rates: Sequence[float] = (1e-3,),
    seeds: Sequence[int] = (0,),
    progress: Any = None,
) -> SweepResult:
    """Train ``plan`` at every learning rate x seed and keep the best learning rate (by mean accuracy over
    seeds), as Zoology does. The best-of selection favours every configuration alike, so comparisons between
    plans stay fair; the reported interval covers seeds and examples at the chosen rate."""
    if not learning_rates or not seeds:
        raise ValueError("learning_rates and seeds must be non-empty")
    runs: list[TrainResult] = []
    by_rate: dict[str, dict[str, Any]] = {}
    best: tuple[float, float] | None = None
    for rate in learning_rates:
        group = [train(config.replace(learning_rate=float(rate), seed=int(s)), plan, progress=progress) for s in seeds]
        runs.extend(group)
        summary = stats.seed_interval([r.per_example for r in group])
        by_rate[repr(float(rate))] = summary.to_dict()
        if best is None or summary.value > best[1]:
            best = (float(rate), summary.value)
    assert best is not None
    return SweepResult(
        best_learning_rate=best[0], accuracy=stats.Estimate(**by_rate[repr(best[0])]), by_learning_rate=by_rate,
        runs=runs,
    )


def check_graph(config: TrainConfig, plan: Plan | Pattern | Learned | None = None, *, steps: int = 8,
                tolerance: float = 1e-4) -> dict[str, Any]:
    """Train ``steps`` steps of ``config`` twice from the same seed, eagerly and with the step recorded in a
    CUDA graph (:attr:`TrainConfig.cuda_graph`), and compare the loss at every step.

    The recorded run warms up for :data:`GRAPH_WARMUP` eager steps, records the next and replays the rest, so a
    replay that read a stale batch, a baked-in learning rate or temperature, or gradients that accumulate
    shows as a loss that leaves the eager one. ``passed``: the step was recorded and every loss agrees within
    ``tolerance * max(1, |eager loss|)``. On a CPU nothing is recorded (``captured`` False, ``reason`` says why).

    Returns a dict: ``captured``, ``reason``, ``passed``, ``max_loss_difference``, both loss lists, both runs'
    milliseconds per step (averages over all the steps: the eager one includes triton JIT, the recorded one its
    eager warm-up and the recording), ``replay_ms`` (the recorded step alone) and the seconds the check took.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < GRAPH_WARMUP + 2:
        raise ValueError(f"steps must be an int >= {GRAPH_WARMUP + 2} (warm-up, recording, replays), got {steps!r}")
    started = time.perf_counter()
    small = config.replace(steps=steps, test_examples=min(config.test_examples, config.batch_size))
    eager = train(small.replace(cuda_graph=False), plan)
    recorded = train(small.replace(cuda_graph=True), plan)
    difference = max((abs(a - b) / max(1.0, abs(a)) for a, b in zip(eager.losses, recorded.losses, strict=True)),
                     default=float("nan"))
    captured = bool(recorded.graph.get("captured"))
    return {
        "captured": captured, "reason": recorded.graph.get("reason"),
        "passed": captured and len(eager.losses) == steps and difference <= tolerance,
        "max_loss_difference": difference, "tolerance": tolerance, "steps": steps,
        "losses_eager": eager.losses, "losses_graph": recorded.losses,
        "eager_ms_per_step": eager.ms_per_step, "graph_ms_per_step": recorded.ms_per_step,
        "replay_ms": recorded.graph.get("replay_ms"),
        "graph": recorded.graph, "seconds": round(time.perf_counter() - started, 2),
    }
