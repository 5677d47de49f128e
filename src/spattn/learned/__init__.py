"""Learned sparsity: trainable block scorers that are selectors, regularisers against collapse, and metrics.

- :class:`BlockGate`: SeerAttention's pooled-query / max-min-mean-pooled-key gate; :func:`distill` trains one
  per layer of a frozen Hugging Face model (KL to the block-pooled dense attention), :func:`save_gates` /
  :func:`load_gates` keep them in safetensors, :func:`load` makes one a selector
  (``TopK(spattn.learned.load(path, layer=3), 8)``; the registered selector name is ``"gate"``).
- :class:`LearnedTopK`: a block router trained with the model (straight-through top-k or DeepSeek-style
  distillation, with temperature / budget schedules, noise and stochastic block pruning), for
  ``spattn.nn.SparseAttention``.
- Regularisers: :func:`entropy_loss`, :func:`density_loss`, :func:`drop_blocks`, :func:`balance_loss`;
  :func:`collapse_metrics` (distinct blocks, usage and gate entropy).
- Trainers: :func:`train_lm` (from scratch, with any pattern) and :func:`train_task` (a task trainer that takes
  an attention factory).
"""

from spattn.learned.checkpoint import load_gates, read_meta, save_gates
from spattn.learned.distill import block_targets, distill, distill_loss, train_gate
from spattn.learned.gate import BlockGate
from spattn.learned.metrics import collapse_metrics
from spattn.learned.regularisers import balance_loss, density_loss, drop_blocks, entropy_loss, expected_density
from spattn.learned.router import LearnedTopK
from spattn.learned.schedule import Schedule
from spattn.learned.selector import Gate, load

__all__ = [
    "BlockGate", "Gate", "LearnedTopK", "Schedule", "balance_loss", "block_targets", "collapse_metrics",
    "density_loss", "distill", "distill_loss", "drop_blocks", "entropy_loss", "expected_density", "load",
    "load_gates", "read_meta", "save_gates", "train_gate",
]
