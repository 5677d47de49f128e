"""Integrations with model libraries: Hugging Face transformers (``patch`` / ``unpatch`` / ``patched``), the
per-layer ``Plan``, and offline model loaders (``load_smollm2``, ``load_minilm``). transformers is imported
only when a function needs it (extra ``hf``)."""

from spattn.integrations.hf import attention_modules, patch, patched, register, unpatch
from spattn.integrations.models import load_minilm, load_smollm2
from spattn.integrations.plan import BudgetRule, Plan

__all__ = ["BudgetRule", "Plan", "attention_modules", "load_minilm", "load_smollm2", "patch", "patched", "register", "unpatch"]
