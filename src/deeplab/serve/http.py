"""HTTP plumbing shared by the service's routes: the API key, JSON errors, request metrics and body limits."""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import Awaitable, Callable

from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .batcher import QueueFull
from .images import ServeError
from .service import Service

Handler = Callable[[Request], Awaitable[Response]]
OPEN = ("/healthz", "/readyz", "/", "/page.js", "/page.css", "/v2/health/live", "/v2/health/ready")


def error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def endpoint(service: Service, handler: Handler, *, route: str) -> Handler:
    """`handler` behind the API key, with its errors as JSON sentences and its status counted in the metrics."""

    async def wrapped(request: Request) -> Response:
        started = time.perf_counter()
        try:
            check_key(service, request, route=route)
            response = await handler(request)
        except ServeError as e:
            response = error(e.status, e.message, e.headers)
        except QueueFull as e:
            response = error(503, f"the service is busy: {e}; try again in a second", {"Retry-After": "1"})
        except Exception as e:  # noqa: BLE001 - one request's failure is its own 500; the server goes on
            first = (str(e).splitlines() or [""])[0][:300]
            response = error(500, f"the model failed on this request ({type(e).__name__}: {first}); other requests "
                             "are not affected")
        service.metrics.request_done(route, response.status_code, time.perf_counter() - started)
        return response

    return wrapped


def check_key(service: Service, request: Request, *, route: str) -> None:
    key = service.settings.api_key
    if not key or route in OPEN or request.method == "OPTIONS":
        return
    sent = request.headers.get("authorization", "")
    token = sent[7:].strip() if sent[:7].lower() == "bearer " else ""
    if not hmac.compare_digest(token.encode(), key.encode()):
        raise ServeError(401, "this service needs an API key: send the header 'Authorization: Bearer KEY'"
                         if not token else "the API key sent is not this service's", headers={"WWW-Authenticate": "Bearer"})


async def read_body(request: Request, *, max_bytes: int, timeout_s: float) -> bytes:
    """The request body, refused with 413 past `max_bytes` (before reading when Content-Length says so) and with 408
    when the client takes more than `timeout_s` to send it."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > max_bytes:
        raise ServeError(413, f"the request body is {int(length):,} bytes, over this service's limit of "
                         f"{max_bytes:,} (--max-bytes)")
    chunks: list[bytes] = []
    size = 0

    async def gather() -> None:
        nonlocal size
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_bytes:
                raise ServeError(413, f"the request body is over this service's limit of {max_bytes:,} bytes "
                                 "(--max-bytes)")
            chunks.append(chunk)

    try:
        await asyncio.wait_for(gather(), timeout=timeout_s)
    except asyncio.TimeoutError:
        raise ServeError(408, f"the request body did not arrive within {timeout_s:g} s; send it at once") from None
    return b"".join(chunks)


async def image_bytes(request: Request, body: bytes) -> bytes:
    """The image of a request: multipart field `image`, or the body itself."""
    kind = request.headers.get("content-type", "")
    if kind.startswith("multipart/form-data"):
        from starlette.formparsers import MultiPartException, MultiPartParser

        async def stream():
            yield body
            yield b""

        try:
            form = await MultiPartParser(Headers(raw=[(b"content-type", kind.encode("latin-1"))]), stream(),
                                         max_files=4, max_fields=16).parse()
        except (MultiPartException, ValueError) as e:
            raise ServeError(400, f"the multipart body cannot be read ({e}); send the image as the field 'image'") from None
        upload = form.get("image")
        if upload is None or isinstance(upload, str):
            fields = ", ".join(sorted(form.keys())) or "none"
            raise ServeError(400, f"the multipart body has no file field 'image' (fields: {fields}); send -F "
                             "image=@photo.jpg")
        data = await upload.read()
        await form.close()
        return data
    if kind.startswith(("text/", "application/json", "application/x-www-form-urlencoded")):
        raise ServeError(415, f"the body is {kind.split(';')[0]}, not an image; send the image file's bytes "
                         "(Content-Type image/jpeg, image/png, ...) or a multipart field 'image'")
    return body
