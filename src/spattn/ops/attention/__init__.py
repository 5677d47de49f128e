from spattn.ops.attention.api import BACKENDS, attention, choose_backend, register_layout_builder
from spattn.ops.attention.graph import CapturedAttention

__all__ = ["attention", "choose_backend", "BACKENDS", "register_layout_builder", "CapturedAttention"]
