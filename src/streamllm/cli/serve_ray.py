"""``streamllm serve-ray``: N replicas of the chat server on Ray Serve, sharing one session store.

SIGINT or SIGTERM stops the application and the Ray cluster this command started. Known limit: once a replica
has died and been replaced, Ray's core has put a SIGTERM handler of its own in place that ends this process at
once and leaves the cluster's processes running; stop it by its process group then (``kill -- -PGID``, or a
service manager that stops the whole group).
"""

from __future__ import annotations

import logging
import signal
import threading
from dataclasses import replace

from .common import InputError, positive
from .serve import model_choice, server_args, server_config


def add_parser(sub) -> None:
    s = sub.add_parser(
        "serve-ray",
        help="N replicas of the server on Ray Serve behind one router, sharing a session store (needs Ray: "
        "pip install 'streamllm[ray]')",
    )
    server_args(s)
    s.add_argument("--replicas", type=positive, default=2, help="replicas of the server (default 2)")
    s.add_argument(
        "--cpus-per-replica", type=float, default=1.0, help="CPUs Ray reserves for each replica (default 1)"
    )
    s.add_argument("--ray-address", help="join this Ray cluster (default: start one on this machine)")
    s.set_defaults(run=run)


def run(args) -> int:
    from ..server.logs import configure

    configure(args.log_format)
    config = server_config(args)
    if config.store is None and config.state_dir is None:
        raise InputError(
            "replicas share their sessions through a store: give --store redis://HOST:PORT/DB (or --state-dir "
            "when every replica runs on this machine)"
        )
    try:
        import ray
        from ray import serve
    except ImportError:
        raise InputError("serve-ray needs Ray: pip install 'streamllm[ray]'") from None
    from ..server.ray_serve import application

    ray.init(address=args.ray_address, include_dashboard=False, log_to_driver=args.verbose)
    stop = threading.Event()  # after ray.init, which installs handlers of its own
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        # the password is read again where each replica runs, so that it is never sent through Ray
        replicas = replace(config, store_password=None)
        app = application(
            model_choice(args),
            replicas,
            args.replicas,
            args.cpus_per_replica,
            args.log_format,
            password_file=args.store_password_file,
        )
        serve.run(app, name="streamllm", route_prefix="/")
        logging.getLogger("streamllm.server").warning(
            "%d replicas of %s at http://%s:%d (sessions in %s)",
            args.replicas,
            config.model_id,
            args.host,
            args.port,
            config.store or config.state_dir,
        )
        stop.wait()
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0
