"""The ASGI app of `deeplab serve` (Starlette; run by uvicorn): the routes, access, limits and errors.

Routes: `POST /v1/segment` (an image -> its mask PNG, an overlay PNG or a JSON summary), `GET /v1/model`,
`GET /healthz` (alive), `GET /readyz` (model loaded and warmed up), `GET /metrics` (Prometheus), the Open Inference
Protocol v2 routes (`deeplab.serve.v2`) and the page at `/`. Every error is JSON `{"error": one sentence}` with its
status; an exception inside one request is a 500 for that request only.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from importlib import resources
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from .http import Handler, endpoint, error, image_bytes, read_body
from .images import ServeError, decode_image
from .service import QUERY, Job, Service, flag
from .v2 import routes_v2

def routes_v1(service: Service) -> list[Route]:
    async def segment(request: Request) -> Response:
        query = dict(request.query_params)
        unknown = sorted(set(query) - set(QUERY))
        if unknown:
            known = "; ".join(f"{k} ({v})" for k, v in QUERY.items())
            raise ServeError(400, f"unknown query parameter {unknown[0]!r}; the parameters are {known}")
        fmt = query.get("format", "png").lower()
        if fmt not in ("png", "json"):
            raise ServeError(400, f"format={fmt!r}: send format=png (the mask) or format=json")
        with_overlay = flag(query, "overlay") if "overlay" in query else False
        alpha = _alpha(query, service.settings.alpha)
        options = service.options_for(query)
        service.check_ready()
        started = time.perf_counter()
        service.arriving += 1
        try:
            body = await read_body(request, max_bytes=service.settings.max_bytes,
                                   timeout_s=service.settings.read_timeout_s)
            data = await image_bytes(request, body)
            read = time.perf_counter()
            rgb = await asyncio.to_thread(decode_image, data, max_pixels=service.settings.max_pixels)
        finally:
            service.arriving -= 1
        decoded = time.perf_counter()
        service.metrics.in_flight += 1
        try:
            answer = await service.segment(Job(rgb=rgb, options=options))
        finally:
            service.metrics.in_flight -= 1
        computed = time.perf_counter()
        if fmt == "json":
            extra = await asyncio.to_thread(service.overlay_png, rgb, answer.mask, alpha=alpha) if with_overlay else None
            content, media = await asyncio.to_thread(service.summary_json, answer, with_overlay=extra), "application/json"
        elif with_overlay:
            content, media = await asyncio.to_thread(service.overlay_png, rgb, answer.mask, alpha=alpha), "image/png"
        else:
            content, media = await asyncio.to_thread(service.png, answer.mask), "image/png"
        stages = {"read": read - started, "decode": decoded - read, "queue": answer.ms / 1000 - answer.model_ms / 1000,
                  "model": answer.model_ms / 1000, "encode": time.perf_counter() - computed,
                  "total": time.perf_counter() - started}
        headers = {"X-Runtime": service.runtime, "X-Time-Ms": f"{answer.ms:.1f}", "X-Batch": str(answer.batch),
                   "Server-Timing": server_timing(stages)}
        return Response(content, media_type=media, headers=headers)

    async def model_info(request: Request) -> Response:
        return JSONResponse(service.describe())

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "alive"})

    async def readyz(request: Request) -> Response:
        service.check_ready()
        return JSONResponse({"status": "ready", "runtime": service.runtime})

    async def metrics(request: Request) -> Response:
        return PlainTextResponse(service.metrics.render(queue_depth=lambda: service.batcher.depth),
                                 media_type="text/plain; version=0.0.4")

    table = {"/v1/segment": (segment, ["POST"]), "/v1/model": (model_info, ["GET"]), "/healthz": (healthz, ["GET"]),
             "/readyz": (readyz, ["GET"]), "/metrics": (metrics, ["GET"])}
    return [Route(path, endpoint(service, fn, route=path), methods=methods) for path, (fn, methods) in table.items()]


def server_timing(stages: dict[str, float]) -> str:
    """The W3C Server-Timing header of the stages' seconds (in ms; browsers' developer tools show it): where a
    request's time went on the server, e.g. `read;dur=0.4, decode;dur=3.1, queue;dur=0.2, model;dur=41.0, ...`."""
    return ", ".join(f"{name};dur={1000 * max(seconds, 0.0):.2f}" for name, seconds in stages.items())


def _alpha(query: dict[str, str], default: float) -> float:
    if "alpha" not in query:
        return default
    try:
        alpha = float(query["alpha"])
    except ValueError:
        alpha = -1.0
    if not 0.0 <= alpha <= 1.0:
        raise ServeError(400, f"alpha={query['alpha']!r} must be a number in [0, 1], e.g. alpha=0.5")
    return alpha


def page_routes(service: Service) -> list[Route]:
    """The page at `/`: plain HTML, CSS and JavaScript shipped in the package (no CDN: it works offline)."""
    files = {"/": ("index.html", "text/html; charset=utf-8"), "/page.js": ("page.js", "text/javascript"),
             "/page.css": ("page.css", "text/css")}

    def serve_file(name: str, media: str) -> Handler:
        text = resources.files(__package__).joinpath("page", name).read_text(encoding="utf-8")

        async def handler(request: Request) -> Response:
            return Response(text, media_type=media, headers={"Cache-Control": "no-cache"})

        return handler

    return [Route(path, endpoint(service, serve_file(*spec), route=path), methods=["GET"])
            for path, spec in files.items()]


def create_app(service: Service) -> Starlette:
    """The app for `service`: warmed up at start-up (so /readyz turns ready once the runtime is chosen), and at
    shutdown (SIGTERM under uvicorn) every request already taken is finished before the worker stops."""
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        await service.batcher.start()
        warm = asyncio.create_task(service.warm_up())
        try:
            yield
        finally:
            if not warm.done():
                warm.cancel()
            await service.batcher.stop()

    async def not_found(request: Request, exc: Any) -> Response:
        status = getattr(exc, "status_code", 404)
        message = (f"no such route {request.url.path}; the API is POST /v1/segment, GET /v1/model, /healthz, /readyz, "
                   "/metrics, /v2/... and the page at /") if status == 404 else f"{request.method} is not allowed on "\
                   f"{request.url.path}"
        service.metrics.request_done("other", status, 0.0)
        return error(status, message)

    middleware = []
    if service.settings.cors:
        from starlette.middleware import Middleware
        from starlette.middleware.cors import CORSMiddleware

        middleware.append(Middleware(CORSMiddleware, allow_origins=list(service.settings.cors),
                                     allow_methods=["GET", "POST"], allow_headers=["Authorization", "Content-Type"]))
    return Starlette(routes=routes_v1(service) + routes_v2(service) + page_routes(service), middleware=middleware,
                     lifespan=lifespan, exception_handlers={HTTPException: not_found})
