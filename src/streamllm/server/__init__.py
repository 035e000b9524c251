"""``streamllm serve``: an OpenAI-compatible chat server whose conversations never hit a context limit.

- ``config``: ``ServerConfig``, the operator's limits and keys, and ``ModelChoice``, the model; ``app``: a server
  built from the two (``load_server``, ``create_app``).
- ``schemas``: request bodies; ``routes``: the endpoints; ``guards``: API key and body-size middleware.
- ``sessions``: which session a request continues, LRU of caches in memory; ``persist``: sessions on disk.
- ``turns``: one request's turn from choosing its session to saving it; ``scheduler``: the model worker.
"""

from .app import create_app, load_server, serve
from .config import ModelChoice, ServerConfig

__all__ = ["ModelChoice", "ServerConfig", "create_app", "load_server", "serve"]
