"""``spattn serve``: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over the spattn runtime, with
Prometheus metrics. Needs the ``serve`` and ``hf`` extras.

    >>> from spattn.serve import Engine, create_app  # doctest: +SKIP
    >>> app = create_app(Engine(runtime, tokenizer))  # doctest: +SKIP
"""

from spattn.serve.app import create_app
from spattn.serve.engine import DrainingError, Engine, QueueFullError, Request

__all__ = ["create_app", "Engine", "Request", "QueueFullError", "DrainingError"]
