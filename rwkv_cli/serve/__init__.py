"""``rwkv serve``'s library: an OpenAI-compatible HTTP server on the batched engine.

- serve/errors.py: errors as the OpenAI API writes them, with their HTTP status;
- serve/protocol.py: request bodies checked and turned into engine requests;
- serve/scheduler.py: the one engine thread that owns the model and runs continuous batching;
- serve/responses.py: engine records written as response bodies and stream events;
- serve/app.py: the ASGI application (Starlette) and its routes.
"""

from rwkv_cli.serve.app import create_app
from rwkv_cli.serve.scheduler import Scheduler

__all__ = ["Scheduler", "create_app"]
