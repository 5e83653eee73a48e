"""`deeplab serve`: the model behind an HTTP API and a web page (`deeplab.serve`), run by uvicorn."""

from __future__ import annotations

import argparse
import os
import signal
import sys

from .flags import add_inference_flags, inference_options, load_for_inference, number, resolve_device, size_arg

API_KEY_ENV = "DEEPLAB_API_KEY"


def _settings(args: argparse.Namespace):
    from pathlib import Path

    from ..serve import ServeSettings

    warmup = args.warmup_size if isinstance(args.warmup_size, tuple) else None
    return ServeSettings(
        name=args.name or Path(args.checkpoint.rstrip("/\\")).stem, max_batch=args.max_batch,
        batch_wait_ms=args.batch_wait_ms, max_queue=args.max_queue, max_bytes=int(args.max_mb * 2**20),
        max_pixels=int(args.max_megapixels * 1e6), read_timeout_s=args.read_timeout,
        api_key=args.api_key or os.environ.get(API_KEY_ENV) or None, cors=tuple(args.cors or ()),
        warmup_size=warmup, alpha=args.alpha,
    )


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from ..serve import Service, create_app
    except ImportError as e:
        raise ValueError(f"deeplab serve needs the optional web packages ({e.name} is missing): "
                         "pip install 'deeplab[serve]'") from None
    settings = _settings(args)
    model, _ = load_for_inference(args.checkpoint, args)
    if next(model.parameters(), None) is not None:
        model = model.to(resolve_device(args.device))
    service = Service(model, options=inference_options(args), settings=settings)
    local = args.host in ("127.0.0.1", "localhost", "::1")
    if not local and not settings.api_key:
        print(f"deeplab serve: warning: listening on {args.host} without an API key: anyone who can reach this "
              f"machine can use the model; set --api-key or {API_KEY_ENV}", file=sys.stderr)
    print(f"deeplab serve: {settings.name} on http://{args.host}:{args.port}/ (the page), API at /v1/segment; "
          f"batches of up to {settings.max_batch} within {settings.batch_wait_ms:g} ms, queue {settings.max_queue}"
          + ("; API key required" if settings.api_key else ""), flush=True)
    # uvicorn handles SIGTERM and Ctrl-C: it stops accepting, lets the requests in flight finish (the batcher
    # finishes what it has taken) and runs the app's shutdown; then it raises the signal again for the handler it
    # found, which is this one: a clean stop, exit status 0 (the default handler would report death by signal).
    before = {sig: signal.signal(sig, _exit_cleanly) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        uvicorn.run(create_app(service), host=args.host, port=args.port, log_level=args.log_level,
                    timeout_graceful_shutdown=args.grace, access_log=args.log_level in ("debug", "info"))
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
    return 0


def _exit_cleanly(signum: int, frame: object) -> None:
    raise SystemExit(0)


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="serve a model over HTTP: POST /v1/segment, the Open Inference Protocol v2, "
                       "metrics, health checks and a web page at /")
    p.add_argument("--checkpoint", required=True, help="deeplab checkpoint, model folder or Hub repo id owner/name, or "
                   "a .onnx / OpenVINO .xml file from `deeplab export` or `deeplab quantize` (anything `deeplab "
                   "predict` takes)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s: this machine only; "
                   "0.0.0.0 for every network, with --api-key)")
    p.add_argument("--port", type=number(int, 0, "a port number, e.g. 8000"), default=8000,
                   help="port (default %(default)s)")
    p.add_argument("--name", default=None, help="the model's name in /v1/model and the /v2 routes (default: the "
                   "checkpoint's file name)")
    g = p.add_argument_group("batching and limits")
    g.add_argument("--max-batch", type=number(int, 1, "a positive number of requests"), default=8,
                   help="requests run together in one network call at most (default %(default)s)")
    g.add_argument("--batch-wait-ms", type=number(float, 0, "milliseconds, e.g. 5"), default=5.0,
                   help="how long the first request of a batch waits for company (default %(default)s ms)")
    g.add_argument("--max-queue", type=number(int, 1, "a positive number of requests"), default=64,
                   help="requests waiting for the model at most; past it the service answers 503 with Retry-After "
                   "(default %(default)s)")
    g.add_argument("--max-mb", type=number(float, 0.001, "megabytes, e.g. 20"), default=20.0,
                   help="request body limit in MiB (default %(default)s); larger bodies get 413")
    g.add_argument("--max-megapixels", type=number(float, 0.000001, "megapixels, e.g. 40"), default=40.0,
                   help="image size limit (default %(default)s megapixels); larger images and decompression bombs get 413")
    g.add_argument("--read-timeout", type=number(float, 0.001, "seconds, e.g. 30"), default=30.0,
                   help="seconds a client has to send its body (default %(default)s); slower ones get 408")
    g.add_argument("--grace", type=number(int, 1, "seconds, e.g. 30"), default=30,
                   help="on SIGTERM, seconds to finish the requests in flight before exiting (default %(default)s)")
    g.add_argument("--warmup-size", type=size_arg, default="model",
                   help="HxW of the image the model is warmed up and its runtime chosen on (default: the model's "
                   "input size, else 513x513)")
    g = p.add_argument_group("access")
    g.add_argument("--api-key", default=None, help=f"require 'Authorization: Bearer KEY' on every call but the health "
                   f"checks and the page (or set {API_KEY_ENV})")
    g.add_argument("--cors", action="append", metavar="ORIGIN", help="let pages from ORIGIN (e.g. "
                   "https://maps.example.org) call the API; repeat for more (default: none)")
    g.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"],
                   help="uvicorn's log level; info also logs each request (default %(default)s)")
    p.add_argument("--alpha", type=number(float, 0, "in [0, 1], e.g. 0.5", below=1, below_inclusive=True), default=0.5,
                   help="overlay colour weight of ?overlay=1 and the page (default %(default)s)")
    add_inference_flags(p)
    p.set_defaults(func=run)
