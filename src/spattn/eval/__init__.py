"""Evaluation on real models and tasks (``spattn.eval.lm``: perplexity, agreement, KL, embedding drift)."""
