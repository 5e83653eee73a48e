"""Uploaded images: decoded as `deeplab predict` reads files, after the limits a public endpoint needs.

The header is read before any pixel: an image larger than `max_pixels` (a 100,000 x 100,000 PNG of a few kilobytes
is a decompression bomb) is refused with 413 without decoding it; anything Pillow cannot identify is 415; an image
it identifies but cannot decode (cut short, corrupt) is 400. Every refusal is a `ServeError`: an HTTP status and one
sentence for the client.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image

from ..data.base import image_to_rgb


# The first bytes of the image formats people send: bytes that start like one of them but do not open are a broken
# image (400), anything else is not an image at all (415).
SIGNATURES = {b"\x89PNG\r\n\x1a\n": "PNG", b"\xff\xd8\xff": "JPEG", b"GIF87a": "GIF", b"GIF89a": "GIF", b"BM": "BMP",
              b"II*\x00": "TIFF", b"MM\x00*": "TIFF", b"RIFF": "WebP"}


class ServeError(Exception):
    """A request the service refuses: `status` (4xx / 5xx) and one sentence saying what is wrong and what to send."""

    def __init__(self, status: int, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


def decode_image(data: bytes, *, max_pixels: int, name: str = "the image") -> np.ndarray:
    """(H, W, 3) uint8 RGB of an uploaded image file (converted as training and `deeplab predict` convert files:
    `deeplab.data.base.image_to_rgb`), or a ServeError."""
    if not data:
        raise ServeError(400, f"{name} is empty; send the bytes of a JPEG, PNG, BMP, TIFF or WebP file")
    try:
        with warnings.catch_warnings():
            # Pillow warns, then raises, past its own pixel limit; the limit here is max_pixels, checked below.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        raise ServeError(413, f"{name} declares more pixels than any photo has (a decompression bomb?); the limit is "
                         f"{max_pixels:,} pixels") from None
    except Exception as e:  # noqa: BLE001 - Pillow raises many kinds for bytes that are not an image
        kind = next((k for sig, k in SIGNATURES.items() if data.startswith(sig)), None)
        if kind is not None:
            detail = (str(e).splitlines() or [type(e).__name__])[0][:160]
            raise ServeError(400, f"{name} starts as a {kind} file but cannot be opened ({detail}); it may be cut "
                             "short or corrupt: send the whole file") from None
        raise ServeError(415, f"{name} is not an image file Pillow can read ({len(data):,} bytes starting "
                         f"{data[:8]!r}); send a JPEG, PNG, BMP, TIFF or WebP file") from None
    with image:
        width, height = image.size
        if width * height > max_pixels:
            raise ServeError(413, f"{name} is {width} x {height} = {width * height:,} pixels, over this service's "
                             f"limit of {max_pixels:,} (--max-pixels); send a smaller image or tile it")
        if width < 1 or height < 1:
            raise ServeError(400, f"{name} has no pixels ({width} x {height})")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                image.load()
            return image_to_rgb(image)
        except Exception as e:  # noqa: BLE001 - truncated or corrupt data: Pillow's own reason, in one line
            detail = (str(e).splitlines() or [type(e).__name__])[0][:160]
            raise ServeError(400, f"{name} is a {image.format} file that cannot be decoded ({detail}); it may be cut "
                             "short or corrupt: send the whole file") from None


def encode_png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()
