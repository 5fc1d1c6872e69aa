"""`bertforge serve MODEL [MODEL ...]`: arguments and the runner (uvicorn).

Each MODEL is a folder (ours, Hugging Face BERT, sentence-transformers), a hub id, or `name=PATH` to
serve it under `name` (default: the folder's name). Every model loads and runs one warm-up batch
before the port opens; SIGINT/SIGTERM stop accepting connections, let in-flight requests finish
(up to --graceful-timeout seconds) and exit. FastAPI and uvicorn come from the `serve` extra.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import socket
import sys
from pathlib import Path

from bertforge.errors import BertforgeError

API_KEY_ENV = "BERTFORGE_API_KEY"
INSTALL = 'pip install "bertforge[serve]"'


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("models", nargs="+", metavar="MODEL",
                   help="model folder or hub id, or NAME=PATH to serve it under NAME")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="(default: %(default)s)")
    p.add_argument("--api-key", default=None, metavar="KEY",
                   help=f"require 'Authorization: Bearer KEY' on every route but /health and the page "
                        f"(default: ${API_KEY_ENV} when set)")
    p.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="allow browser calls from ORIGIN (repeatable; default: CORS off)")
    p.add_argument("--max-batch-tokens", type=int, default=None, metavar="N",
                   help="tokens per dynamic batch across requests (default: 4096 per torch thread, so "
                        "that one batch computes while the next one queues)")
    p.add_argument("--max-wait-ms", type=float, default=2.0, metavar="MS",
                   help="longest a request waits for others to fill a batch (default: %(default)s)")
    p.add_argument("--max-queue-tokens", type=int, default=262144, metavar="N",
                   help="queued tokens per model before requests get 503 + Retry-After (default: %(default)s)")
    p.add_argument("--max-texts", type=int, default=2048, metavar="N",
                   help="texts per request (default: %(default)s)")
    p.add_argument("--max-chars", type=int, default=100_000, metavar="N",
                   help="characters per text (default: %(default)s)")
    p.add_argument("--max-body-mb", type=float, default=8.0, metavar="MB",
                   help="request body size (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch threads for the model (default: torch's choice, one per core)")
    p.add_argument("--graceful-timeout", type=float, default=30.0, metavar="S",
                   help="on SIGINT/SIGTERM, wait up to S seconds for in-flight requests (default: %(default)s)")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))


def parse_models(specs: list[str]) -> dict[str, str]:
    """NAME=PATH / PATH specs -> {name: path}; names must be unique."""
    out: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or Path(spec).exists():
            name, path = Path(spec.rstrip("/")).name or spec, spec
        if not name or not path:
            raise BertforgeError(f"model '{spec}' is not PATH or NAME=PATH: pass e.g. minilm=path/to/all-MiniLM-L6-v2")
        if name in out:
            raise BertforgeError(f"two models are named '{name}': serve them as NAME=PATH with different names")
        out[name] = path
    return out


def check_settings(args: argparse.Namespace) -> None:
    for flag in ("port", "max_batch_tokens", "max_queue_tokens", "max_texts", "max_chars"):
        value = getattr(args, flag)
        if value is not None and value < (0 if flag == "port" else 1) or (flag == "port" and value > 65535):
            raise BertforgeError(f"--{flag.replace('_', '-')} {value} is out of range: pass a positive number"
                                 + (" up to 65535" if flag == "port" else ""))
    if args.max_wait_ms < 0 or args.max_body_mb <= 0:
        raise BertforgeError("--max-wait-ms must be >= 0 and --max-body-mb > 0")


def run_serve(args: argparse.Namespace) -> int:
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn
    except ImportError as exc:
        raise BertforgeError(f"bertforge serve needs FastAPI, uvicorn and prometheus-client ({exc.name} is "
                             f"missing): {INSTALL}") from None
    check_settings(args)
    specs = parse_models(args.models)
    check_port(args.host, args.port)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s:     %(message)s")
    import torch

    from bertforge.api import load
    from bertforge.serve.app import create_app
    from bertforge.serve.core import ServeSettings

    if args.threads:
        torch.set_num_threads(args.threads)
    models = {}
    for name, path in specs.items():
        models[name] = load(path, name=name)
        logging.getLogger("bertforge.serve").info("loaded %s from %s (%s)", name, path, models[name].head)
    host = f"[{args.host}]" if _is_ipv6(args.host) else args.host
    settings = ServeSettings(api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
                             cors_origins=args.cors_origin, max_batch_tokens=args.max_batch_tokens,
                             max_wait_ms=args.max_wait_ms, max_queue_tokens=args.max_queue_tokens,
                             max_texts=args.max_texts, max_chars=args.max_chars,
                             max_body_bytes=int(args.max_body_mb * (1 << 20)),
                             public_url=f"http://{host}:{args.port}/")
    if not _is_loopback(args.host):
        print(f"warning: serving on {args.host}, reachable from other machines"
              + ("" if settings.api_key else "; set --api-key"), file=sys.stderr)
    app = create_app(models, settings)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level,
                timeout_graceful_shutdown=args.graceful_timeout, access_log=args.log_level == "debug")
    return 0


def check_port(host: str, port: int) -> None:
    """Fail before loading any model when the address cannot be bound."""
    family = socket.AF_INET6 if _is_ipv6(host) else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise BertforgeError(f"cannot listen on {host}:{port} ({exc.strerror}): pick another --port or "
                                 "--host") from None


def _is_ipv6(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).version == 6
    except ValueError:
        return False


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
