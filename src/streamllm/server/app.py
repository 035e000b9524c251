"""Assembling the server: the FastAPI app, its middleware and lifecycle, and running it under uvicorn."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import replace

from fastapi import FastAPI

from . import errors, page
from .access import AccessLog
from .config import ModelChoice, ServerConfig
from .guards import AuthGuard, BodyLimit
from .metrics import Metrics, SessionGauges
from .routes import Api
from .scheduler import Scheduler
from .sessions import SessionStore
from .stores import store_name
from .turns import Turns

log = logging.getLogger(__name__)


def create_app(model, tokenizer, config: ServerConfig) -> FastAPI:
    """An ASGI app serving ``model`` (prepared for streaming, e.g. from ``streamllm.load_model``).

    The model worker thread starts with the app's lifespan (uvicorn, or ``with TestClient(app)``).
    """
    metrics = Metrics()
    store = SessionStore(model, config, metrics)
    metrics.registry.register(SessionGauges(store, metrics.guard))
    scheduler = Scheduler(model, config.batch_decode, on_batch=metrics.decode_batch)
    turns = Turns(model, tokenizer, config, store, scheduler)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        store.scan_storage()
        scheduler.start()
        log.info("serving %s; %s", config.model_id, describe(config))
        try:
            yield
        finally:
            scheduler.stop()
            store.close()

    app = FastAPI(
        title="streamllm",
        summary="OpenAI-compatible endless chat with attention sinks",
        version=_version(),
        lifespan=lifespan,
        docs_url=None,  # the interactive docs fetch scripts from a CDN; the schema is at /openapi.json
        redoc_url=None,
    )
    app.state.turns, app.state.metrics = turns, metrics
    errors.install(app)
    app.include_router(Api(turns, config, time.time(), metrics).router())
    app.include_router(metrics.router())
    app.include_router(page.router())
    # Added innermost first: every request is counted and logged (a refused one too), and the key is checked
    # before a body is read.
    app.add_middleware(BodyLimit, config=config)
    app.add_middleware(AuthGuard, config=config)
    app.add_middleware(AccessLog, metrics=metrics)
    return app


def load_server(
    choice: ModelChoice, config: ServerConfig, progress: Callable[[str], None] | None = None
) -> tuple:
    """(model, tokenizer, ``config`` with the path the model takes): the model ``choice`` names, a built-in one
    pulled first where it is not yet (``progress`` hears how that goes), with torch's threads set. ``serve`` and
    every Ray replica are built by this."""
    import torch

    from ..models import BUILTINS, is_pulled, load_model, pull
    from ..runtime.stream import decode_path

    if choice.threads:
        torch.set_num_threads(choice.threads)
    if not sys.stderr.isatty():  # a log or a pipe gets no progress bars from transformers
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    if choice.name in BUILTINS and not is_pulled(choice.name):
        pull(choice.name, progress=progress or log.info)
    model, tokenizer = load_model(choice.name, choice.dtype)
    path = {"dtype": choice.dtype, "decode": decode_path(model, config.stream), "why": choice.why}
    return model, tokenizer, replace(config, path=path | {"kv_dtype": config.stream.kv_dtype})


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("streamllm")
    except PackageNotFoundError:
        return "0"


def describe(config: ServerConfig) -> str:
    """One line for the operator: the cache, memory, where sessions live, the limits."""
    where = "sessions kept by this process only"
    if config.store or config.state_dir:
        where = f"sessions saved in {store_name(config)}"
    keys = f"{len(config.api_keys)} API key(s)" if config.api_keys else "no API key"
    m = config.stream.memory
    memory = (
        f" with memory ({m.blocks} blocks of {m.block_size} recalled, {m.ram_mb} MiB of RAM per session)"
        if m
        else ""
    )
    return (
        f"cache {config.stream.num_sinks}+{config.stream.window} ({config.stream.method}){memory}, {where}, "
        f"{config.max_sessions} sessions resident at most, decode batches of {config.batch_decode}, {keys}"
    )


def serve(
    model,
    tokenizer,
    config: ServerConfig,
    host: str,
    port: int,
    log_level: str = "info",
    log_format: str = "text",
) -> None:
    """Run the server until interrupted (SIGINT/SIGTERM stop it gracefully). ``log_format`` "json" leaves
    uvicorn's logging config out, so that its lines too go through the root logger's JSON lines (``logs``)."""
    import uvicorn
    from uvicorn.config import LOGGING_CONFIG

    app = create_app(model, tokenizer, config)
    uvicorn.run(
        app,
        host=host,
        port=port,
        log_level=log_level,
        timeout_graceful_shutdown=5,
        access_log=False,  # the access lines are ours (``access.py``): with sessions and tokens
        log_config=None if log_format == "json" else LOGGING_CONFIG,
    )
