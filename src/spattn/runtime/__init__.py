"""The runtime: sparse decode inside Hugging Face ``generate``, a controller (latency target, recall floor,
dense fallback), monitoring (Prometheus metrics, JSON logs). Needs the ``hf`` extra; metrics need ``serve``.

    >>> from spattn.runtime import Runtime, ControllerConfig  # doctest: +SKIP
    >>> runtime = Runtime(model, plan, controller=ControllerConfig(latency_target_ms=50))  # doctest: +SKIP
    >>> runtime.generate(**tokenizer("Hello", return_tensors="pt"), max_new_tokens=16)  # doctest: +SKIP
"""

from spattn.runtime.cache import PagedLayer, SpattnCache
from spattn.runtime.controller import Controller, ControllerConfig
from spattn.runtime.decode import DecodePlan, DecodeSelection, decode_plan, paged_attention, sampled_recall, select
from spattn.runtime.engine import NAME, Runtime, register
from spattn.runtime.monitor import LEVEL, JsonFormatter, Metrics, configure_json_logging, instrument

__all__ = [
    "PagedLayer", "SpattnCache", "Controller", "ControllerConfig", "DecodePlan", "DecodeSelection", "decode_plan",
    "paged_attention", "sampled_recall", "select", "NAME", "Runtime", "register", "LEVEL", "JsonFormatter",
    "Metrics", "configure_json_logging", "instrument",
]
