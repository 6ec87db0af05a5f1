"""Images in and out of the service: query images from a request, sample images as PNG.

Every query image goes through the engine's one conversion path (`retrac.datasets.load_image_file`),
so a query gets exactly the pixels it would have as a training sample: an uploaded file as is, a
base64 file once decoded, and a nested array after packing it as a `.npy` file.
"""

from __future__ import annotations

import base64
import binascii
import io

import numpy as np
import torch
from PIL import Image

from api_schemas.attribution import ArrayImage, EncodedImage
from retrac.datasets import MAX_IMAGE_SIDE, Conversions, load_image_file
from retrac.exceptions import DatasetError

FORMATS_HINT = "send a PNG, JPEG, BMP, WEBP, GIF or TIFF file, or a .npy array"

SIDE_PER_RESOLUTION = 16
"""A query image's side may be at most this many times the index's resolution (and at most the
engine's MAX_IMAGE_SIDE): it is scaled down to the resolution anyway, and the bound caps what one
image costs decoded, before the engine lock: float32 RGBA at 16 x 32 px is 4 MB."""


def max_side(resolution: int) -> int:
    """The largest side of a query image for an index of `resolution`."""
    return min(MAX_IMAGE_SIDE, SIDE_PER_RESOLUTION * resolution)


def decode_file(
    data: bytes, *, resolution: int, channels: int, name: str, conversions: Conversions
) -> torch.Tensor:
    """One uploaded file as `(channels, resolution, resolution)` in [-1, 1], what it converted counted
    in `conversions`; DatasetError names it."""
    try:
        return load_image_file(
            data,
            resolution=resolution,
            channels=channels,
            max_side=max_side(resolution),
            conversions=conversions,
        )
    except DatasetError as error:
        message = str(error).replace("image bytes", name, 1)  # the engine's name for bytes without a path
        if "not a readable" in message and ".npy array" not in message:  # a broken file: say what to send
            message += f"; {FORMATS_HINT}"
        raise DatasetError(message) from error


def decode_json_image(
    image: EncodedImage | ArrayImage, *, resolution: int, channels: int, name: str, conversions: Conversions
) -> torch.Tensor:
    """One image of a JSON request (base64 file or nested array) as `decode_file` returns it."""
    if isinstance(image, EncodedImage):
        try:
            data = base64.b64decode(image.base64, validate=True)
        except (binascii.Error, ValueError) as error:
            raise DatasetError(
                f"{name}: not valid base64 ({error}); send the file's bytes in standard base64"
            ) from error
        return decode_file(data, resolution=resolution, channels=channels, name=name, conversions=conversions)
    try:
        array = np.asarray(image.array, dtype=np.float32)
    except ValueError as error:
        raise DatasetError(
            f"{name}: rows of unequal length; every row needs the same number of pixels"
        ) from error
    packed = io.BytesIO()
    np.save(packed, array, allow_pickle=False)
    return decode_file(
        packed.getvalue(), resolution=resolution, channels=channels, name=name, conversions=conversions
    )


def png_bytes(pixels: np.ndarray, size: int | None = None) -> bytes:
    """`(H, W)` or `(H, W, 3)` uint8 as PNG bytes, scaled so its longer side is `size` (blocky when enlarged,
    so that the pixels the model saw stay visible)."""
    image = Image.fromarray(pixels)
    if size is not None and size != max(image.size):
        scale = size / max(image.size)
        shape = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(shape, Image.Resampling.NEAREST if scale > 1 else Image.Resampling.LANCZOS)
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()
