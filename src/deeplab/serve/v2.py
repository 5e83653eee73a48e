"""The Open Inference Protocol (KServe / Triton "v2") over HTTP/JSON, so their clients call the model unchanged.

Server: `GET /v2` (metadata), `/v2/health/live`, `/v2/health/ready` (200 yes, 400 no, as the protocol says). Model
(also under `/versions/1`): `GET /v2/models/NAME` (metadata), `GET .../ready`, `POST .../infer`. The input tensor is
`image`: the RGB pixels, datatype UINT8, shape [H, W, 3] or [N, H, W, 3] (data nested or flat, row-major); or
datatype BYTES, shape [N], each element an image file in base64. The output tensor is `mask`: UINT8 class indices,
[H, W] or [N, H, W] as the input had a batch axis or not. Each image of a request joins the dynamic batcher on its
own, as every other request does.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
from typing import Any

import numpy as np
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..deploy.choice import deeplab_version
from .http import endpoint, read_body
from .images import ServeError, decode_image
from .service import Job, Service


def _model_name(service: Service, request: Request) -> None:
    name = request.path_params["name"]
    version = request.path_params.get("version", "1")
    if name != service.settings.name or version != "1":
        raise ServeError(404, f"no model {name!r} version {version!r} here; this server has {service.settings.name!r} "
                         "version '1'")


def _tensor(request_json: Any) -> dict[str, Any]:
    inputs = request_json.get("inputs") if isinstance(request_json, dict) else None
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise ServeError(400, "the request needs 'inputs': one tensor named 'image' (UINT8 [H, W, 3] or "
                         "[N, H, W, 3], or BYTES [N] of base64 image files)")
    tensor = inputs[0]
    if tensor.get("name") != "image":
        raise ServeError(400, f"the input tensor is named {tensor.get('name')!r}; name it 'image'")
    return tensor


def _images(tensor: dict[str, Any], *, max_pixels: int) -> tuple[list[np.ndarray], bool]:
    """The images of the input tensor, and whether it had a batch axis."""
    shape, kind, data = tensor.get("shape"), tensor.get("datatype"), tensor.get("data")
    if not isinstance(shape, list) or not all(isinstance(s, int) and s > 0 for s in shape) or data is None:
        raise ServeError(400, f"the 'image' tensor needs a shape of positive integers and data, got shape {shape!r}")
    if kind == "BYTES":
        items = np.asarray(data, dtype=object).ravel()
        if len(shape) != 1 or items.size != shape[0] or not all(isinstance(i, str) for i in items):
            raise ServeError(400, f"a BYTES 'image' tensor is shape [N] of base64 strings; got shape {shape} with "
                             f"{items.size} elements")
        try:
            files = [base64.b64decode(i, validate=True) for i in items]
        except (binascii.Error, ValueError):
            raise ServeError(400, "a BYTES 'image' element is not base64; encode each image file with base64") from None
        return [decode_image(f, max_pixels=max_pixels, name=f"image {i}") for i, f in enumerate(files)], True
    if kind != "UINT8":
        raise ServeError(400, f"the 'image' tensor's datatype is {kind!r}; send UINT8 RGB pixels or BYTES image files")
    if len(shape) not in (3, 4) or shape[-1] != 3:
        raise ServeError(400, f"a UINT8 'image' tensor is [H, W, 3] or [N, H, W, 3] RGB; got shape {shape}")
    if int(np.prod(shape[-3:-1])) > max_pixels:
        raise ServeError(413, f"the image has {int(np.prod(shape[-3:-1])):,} pixels, over the limit of {max_pixels:,}")
    try:
        pixels = np.asarray(data, dtype=np.int64).reshape(shape)
    except (ValueError, TypeError):
        raise ServeError(400, f"the 'image' data do not fill shape {shape} with integers") from None
    if pixels.min(initial=0) < 0 or pixels.max(initial=0) > 255:
        raise ServeError(400, "UINT8 pixels lie in 0..255")
    pixels = pixels.astype(np.uint8)
    return (list(pixels), True) if len(shape) == 4 else ([pixels], False)


async def _read_request(service: Service, request: Request) -> tuple[Any, list[np.ndarray], bool]:
    body = await read_body(request, max_bytes=service.settings.max_bytes, timeout_s=service.settings.read_timeout_s)
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise ServeError(400, "the body is not JSON; send an inference request object {\"inputs\": [...]}") from None
    images, batched = await asyncio.to_thread(_images, _tensor(payload), max_pixels=service.settings.max_pixels)
    return payload, images, batched


def routes_v2(service: Service) -> list[Route]:
    async def server(request: Request) -> Response:
        return JSONResponse({"name": "deeplab", "version": deeplab_version(), "extensions": []})

    async def live(request: Request) -> Response:
        return JSONResponse({"live": True})

    async def ready(request: Request) -> Response:
        return JSONResponse({"ready": service.ready}, status_code=200 if service.ready else 400)

    async def model_ready(request: Request) -> Response:
        _model_name(service, request)
        return JSONResponse({"name": service.settings.name, "ready": service.ready},
                            status_code=200 if service.ready else 400)

    async def metadata(request: Request) -> Response:
        _model_name(service, request)
        return JSONResponse({
            "name": service.settings.name, "versions": ["1"], "platform": "deeplab",
            "inputs": [{"name": "image", "datatype": "UINT8", "shape": [-1, -1, -1, 3]}],
            "outputs": [{"name": "mask", "datatype": "UINT8", "shape": [-1, -1, -1]}],
        })

    async def infer(request: Request) -> Response:
        _model_name(service, request)
        service.check_ready()
        service.arriving += 1
        try:
            payload, images, batched = await _read_request(service, request)
        finally:
            service.arriving -= 1
        answers = await asyncio.gather(*(service.segment(Job(rgb=rgb, options=service.options)) for rgb in images))
        masks = [a.mask for a in answers]
        if batched and len({m.shape for m in masks}) > 1:
            raise ServeError(400, "the images of one BYTES request have different sizes; send them one per request")
        mask = np.stack(masks) if batched else masks[0]
        out = {"model_name": service.settings.name, "model_version": "1",
               "outputs": [{"name": "mask", "datatype": "UINT8", "shape": list(mask.shape),
                            "data": mask.ravel().tolist()}]}
        if isinstance(payload, dict) and "id" in payload:
            out["id"] = payload["id"]
        return JSONResponse(out)

    table = [("/v2", server, "GET"), ("/v2/health/live", live, "GET"), ("/v2/health/ready", ready, "GET")]
    for base in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
        table += [(base, metadata, "GET"), (base + "/ready", model_ready, "GET"), (base + "/infer", infer, "POST")]
    return [Route(path, endpoint(service, fn, route=path), methods=[method]) for path, fn, method in table]
