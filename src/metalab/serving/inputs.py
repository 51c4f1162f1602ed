"""A client's request body to checked inputs: JSON, base64 PNG or JPEG bytes, labels, and the limits.

Everything a client sends is data: JSON parsed by `json`, images decoded by Pillow (PNG and
JPEG only), never a file path, never unpickled. An image's header is read and its size checked
against `max_pixels` before its pixels are decoded, so a small file claiming a huge image (a
decompression bomb) costs nothing; Pillow's own bomb checks are turned into the same answer.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import warnings
from dataclasses import dataclass

from PIL import Image

FORMATS = ["PNG", "JPEG"]


class ClientError(Exception):
    """A request the server refuses: HTTP `status`, and the message naming the problem and the fix."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Limits:
    max_images: int  # images in one request, support and query together
    max_image_bytes: int  # one image's encoded bytes
    max_request_bytes: int  # the whole request body
    max_pixels: int  # one image's width x height, read from its header before decoding


@dataclass(frozen=True)
class EncodedImage:
    data: bytes
    name: str  # where it sits in the request: "support[2].image", "images[0]"

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


def parse_body(body: bytes) -> dict:
    try:
        request = json.loads(body)
    except (UnicodeDecodeError, ValueError) as error:
        raise ClientError(400, f"the request body is not JSON ({error}); send a JSON object") from None
    if not isinstance(request, dict):
        raise ClientError(400, f"the request body is a JSON {type(request).__name__}; send a JSON object")
    return request


def support_items(request: dict, limits: Limits) -> tuple[list[EncodedImage], list[str]]:
    """(images, labels) of `request["support"]`, a list of {"label": str, "image": base64}."""
    support = request.get("support")
    if not isinstance(support, list) or not support:
        raise ClientError(
            400,
            'the request has no support examples; send "support": [{"label": "<class>", "image": "<base64 PNG '
            'or JPEG>"}, ...] with examples of at least 2 classes',
        )
    images, labels = [], []
    for i, example in enumerate(support):
        where = f"support[{i}]"
        if not isinstance(example, dict) or set(example) != {"label", "image"}:
            raise ClientError(
                400, f'{where} is not an object of "label" and "image"; send {{"label": ..., "image": ...}}'
            )
        if not isinstance(example["label"], str):
            raise ClientError(400, f"{where}.label is a JSON {type(example['label']).__name__}; labels are strings")
        labels.append(example["label"])
        images.append(encoded_image(example["image"], f"{where}.image", limits))
    return images, labels


def query_items(request: dict, limits: Limits) -> list[EncodedImage]:
    """The images of `request["images"]`, a non-empty list of base64 strings."""
    items = request.get("images")
    if not isinstance(items, list) or not items:
        raise ClientError(400, 'the request has no images to predict; send "images": ["<base64 PNG or JPEG>", ...]')
    return [encoded_image(item, f"images[{i}]", limits) for i, item in enumerate(items)]


def check_count(count: int, limits: Limits) -> None:
    if count > limits.max_images:
        raise ClientError(
            413,
            f"the request holds {count} images, more than max_images={limits.max_images}; send fewer per "
            "request (or start the server with a larger max_images=)",
        )


def encoded_image(value, name: str, limits: Limits) -> EncodedImage:
    if not isinstance(value, str):
        raise ClientError(400, f"{name} is a JSON {type(value).__name__}; send the image file's bytes as base64 text")
    if len(value) * 3 // 4 > limits.max_image_bytes + 3:  # refused before decoding the base64
        raise ClientError(413, f"{name} is larger than max_image_bytes={limits.max_image_bytes}; send a smaller image")
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ClientError(400, f"{name} is not valid base64; send the image file's bytes base64-encoded") from None
    if len(data) > limits.max_image_bytes:
        raise ClientError(
            413,
            f"{name} has {len(data)} bytes, more than max_image_bytes={limits.max_image_bytes}; send a smaller image",
        )
    return EncodedImage(data, name)


def decode(image: EncodedImage, limits: Limits, transform):
    """`transform` (the learner's ImageTransform) of the decoded image: the model's input."""
    try:
        with Image.open(io.BytesIO(image.data), formats=FORMATS) as opened:
            width, height = opened.size
            if width * height > limits.max_pixels:
                raise ClientError(413, too_many_pixels(image.name, f"{width} x {height}", limits))
            opened.load()
            return transform(opened, image.name)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:  # see guard_pillow
        raise ClientError(413, too_many_pixels(image.name, "too many", limits, error)) from None
    except Image.UnidentifiedImageError:
        raise ClientError(400, f"{image.name} is not a PNG or JPEG image; send PNG or JPEG file bytes") from None
    except (OSError, ValueError, SyntaxError, EOFError) as error:  # truncated or corrupt pixel data
        raise ClientError(400, f"{image.name} cannot be decoded ({error}); send a complete PNG or JPEG file") from None


def guard_pillow(limits: Limits) -> None:
    """Make Pillow's own bomb check agree with `max_pixels`, as an error: it warns above its limit
    (and refuses at twice it) while opening, before `decode` sees the size. Process-wide, set once
    by the server (a per-call warnings filter would not be thread-safe)."""
    Image.MAX_IMAGE_PIXELS = limits.max_pixels
    warnings.filterwarnings("error", category=Image.DecompressionBombWarning)


def too_many_pixels(name: str, size: str, limits: Limits, detail: Exception | None = None) -> str:
    return (
        f"{name} claims {size} pixels{f' ({detail})' if detail else ''}, more than max_pixels={limits.max_pixels}; "
        "send a smaller image (the model sees it resized anyway)"
    )
