from spattn.ops.attention.api import BACKENDS, attention, choose_backend

__all__ = ["attention", "choose_backend", "BACKENDS"]
