"""Decode-time ops: :func:`select_pages`, the fused page selection of one decode step (Quest-style scores from
per-page key bounds, safeguards kept, top-k under a device-side budget, block tables written for the split-K
decode kernel) in two triton launches, CUDA-graph safe; :func:`flag_nonfinite`, the per-layer
non-finite check of the static step in one launch; :func:`append_static`, the static cache write of one token
(key, value, page bounds) in one launch. Needs the ``gpu`` extra (triton)."""

from spattn.ops.decode.api import PageTables, append_static, flag_nonfinite, select_pages

__all__ = ["PageTables", "append_static", "flag_nonfinite", "select_pages"]
