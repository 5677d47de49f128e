"""Decode-time ops: :func:`select_pages`, the fused page selection of one decode step (Quest-style scores from
per-page key bounds, safeguards kept, top-k under a device-side budget, block tables written for the split-K
decode kernel) in two triton launches, CUDA-graph safe. Needs the ``gpu`` extra (triton)."""

from spattn.ops.decode.api import PageTables, select_pages

__all__ = ["PageTables", "select_pages"]
