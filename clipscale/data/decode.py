"""Safe, fast image decoding with the random-resized-crop done at decode time.

Only image bytes are decoded (never pickles). The header is checked before any pixel is decoded:
a JPEG's frame header by walking its markers (`jpeg_frame`), any other image by PIL (lazily). Then
the crop box is resized once, by the fastest path for the image:
- a JPEG crop at least twice the output size: decoded at 1/2, 1/4 or 1/8 size (libjpeg DCT scaling
  via `Image.draft`), resized by PIL;
- any other RGB or grey JPEG (the usual 256-512 px web image): decoded by torchvision's libjpeg-turbo
  binding and resized by torch's antialiased bicubic uint8 kernel, about 2x PIL's decode+resize
  per core; the two bicubic filters agree to within rounding (torchvision 0.29 marks its decoder
  deprecated in favour of torchcodec, which needs FFmpeg; the pin keeps it until a pure wheel exists);
- other formats and CMYK JPEGs: PIL.
With `data.decode_device = "cuda"` a colour or grey JPEG is not decoded in the worker: its bytes and
the crop box drawn for it (`JpegCrop`) go to the training process, which decodes them on the GPU
(nvJPEG) and resizes the box there the same way (`decode_jpegs_on`).
Every way an image can be unusable raises `BadSample` with a reason the loader counts.
"""
from __future__ import annotations

import dataclasses
import io
import logging
import math
import random

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torchvision.io import ImageReadMode, decode_jpeg

from clipscale.data.shards import BadSample

log = logging.getLogger(__name__)
MAX_IMAGE_PIXELS = 64_000_000  # larger images are treated as decompression bombs and skipped
WHITE = (255, 255, 255)
EOI = b"\xff\xd9"  # a JPEG's end-of-image marker: one cut short is decoded on the CPU, where it can be skipped


@dataclasses.dataclass(frozen=True)
class JpegCrop:
    """A JPEG left for the training device to decode: its bytes and the crop box drawn for it."""
    data: bytes
    box: tuple[int, int, int, int]  # (left, top, right, bottom) in the full image


def open_image(data: bytes) -> Image.Image:
    """Image bytes -> a lazily decoded PIL image whose header was checked; BadSample otherwise."""
    if not data:
        raise BadSample("empty_image")
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise BadSample("not_an_image") from None
    except Image.DecompressionBombError as e:  # PIL's own limit, checked on open
        raise BadSample("decompression_bomb", str(e)) from None
    except (OSError, ValueError, SyntaxError) as e:  # broken header of a recognised format
        raise BadSample("corrupt_image", str(e)) from None
    width, height = img.size
    if width * height > MAX_IMAGE_PIXELS:
        raise BadSample("decompression_bomb", f"{width}x{height} > {MAX_IMAGE_PIXELS} pixels")
    return img


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB: transparency composited on white, 16-bit and float greys rescaled."""
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, WHITE + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode.startswith("I;16") or img.mode == "I":  # 16-bit greys: PIL's convert would clip at 255
        grey = np.asarray(img, dtype=np.float32) / 257.0
        return Image.fromarray(np.clip(grey + 0.5, 0, 255).astype(np.uint8)).convert("RGB")
    if img.mode == "F":  # float greys in [0, 1]
        grey = np.asarray(img, dtype=np.float32) * 255.0
        return Image.fromarray(np.clip(grey + 0.5, 0, 255).astype(np.uint8)).convert("RGB")
    return img.convert("RGB")  # L, 1, P, CMYK (Adobe inversion handled by PIL), YCbCr, ...


def random_resized_crop_box(width: int, height: int, rng: random.Random, *,
                            scale: tuple[float, float], ratio: tuple[float, float] = (3 / 4, 4 / 3)
                            ) -> tuple[int, int, int, int]:
    """Crop box (left, top, right, bottom) with RandomResizedCrop's distribution (Szegedy et al. 2015).

    Area fraction uniform in `scale`, log aspect ratio uniform in `ratio`; after 10 failed tries,
    a centre crop clamped to `ratio` (the same fallback as torchvision).
    """
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            left = rng.randrange(width - w + 1)
            top = rng.randrange(height - h + 1)
            return left, top, left + w, top + h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def jpeg_frame(data: bytes) -> tuple[int, int, int] | None:
    """(width, height, components) from the frame header of an 8-bit baseline, extended or progressive
    Huffman JPEG, read by walking its markers (a few us; PIL's header parsing costs ~40 us); None
    for any other file, which then goes through PIL."""
    if data[:2] != b"\xff\xd8":
        return None
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
        elif marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            pos += 2
        elif 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # a start of frame
            if marker > 0xC2 or pos + 10 > len(data) or data[pos + 4] != 8:
                return None
            height, width = int.from_bytes(data[pos + 5:pos + 7], "big"), int.from_bytes(data[pos + 7:pos + 9], "big")
            return (width, height, data[pos + 9]) if width and height else None
        elif marker in (0xD9, 0xDA):  # the end, or a scan, before any frame header
            return None
        else:
            pos += 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
    return None


def decode_crop(data: bytes, *, size: int, rng: random.Random, scale: tuple[float, float],
                jpeg_to_device: bool = False) -> np.ndarray | JpegCrop:
    """Image bytes -> uint8 array (3, size, size) of a random resized crop; BadSample on bad images.
    With `jpeg_to_device`, a colour or grey JPEG comes back undecoded, as a `JpegCrop` with the same box."""
    frame = jpeg_frame(data)
    if frame is not None and frame[2] in (1, 3):  # grey or colour JPEG: no PIL header parsing
        width, height, _ = frame
        if width * height > MAX_IMAGE_PIXELS:
            raise BadSample("decompression_bomb", f"{width}x{height} > {MAX_IMAGE_PIXELS} pixels")
        box = random_resized_crop_box(width, height, rng, scale=scale)
        if jpeg_to_device and data.endswith(EOI):
            return JpegCrop(data, box)
        if _short_side(box) < 2 * size:
            return _decoded(_torch_crop, data, box, size)
        img = open_image(data)
        if img.size != (width, height):
            raise BadSample("corrupt_image", f"frame header says {width}x{height}, PIL reads {img.size}")
    else:
        img = open_image(data)
        box = random_resized_crop_box(*img.size, rng, scale=scale)
    return _decoded(_pil_crop, img, box, size)


def _short_side(box: tuple[float, float, float, float]) -> float:
    """A crop at least twice the output on its short side is decoded at reduced size (`_pil_crop`)."""
    return min(box[2] - box[0], box[3] - box[1])


def _decoded(crop, *args) -> np.ndarray:
    try:
        return crop(*args)
    except (OSError, ValueError, SyntaxError, RuntimeError, Image.DecompressionBombError) as e:
        raise BadSample("corrupt_image", str(e)) from None  # truncated or corrupt data


def _torch_crop(data: bytes, box: tuple[int, int, int, int], size: int) -> np.ndarray:
    """Full JPEG decode (libjpeg-turbo) and one antialiased bicubic resize of the integer box."""
    pixels = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    return resize_box(pixels, box, size).numpy()


def resize_box(pixels: torch.Tensor, box: tuple[int, int, int, int], size: int) -> torch.Tensor:
    """(3, H, W) uint8 -> (3, size, size) uint8: the box resized by antialiased bicubic, with torch's
    uint8 kernel on the CPU; in float, rounded, on other devices (which have no uint8 kernel)."""
    crop = pixels[None, :, box[1]:box[3], box[0]:box[2]]  # (1, 3, h, w) uint8
    if crop.device.type == "cpu":
        return F.interpolate(crop, size=(size, size), mode="bicubic", antialias=True)[0]
    resized = F.interpolate(crop.float(), size=(size, size), mode="bicubic", antialias=True)[0]
    return resized.round_().clamp_(0, 255).to(torch.uint8)


def decode_jpegs_on(jpegs: list[JpegCrop], *, size: int, device: torch.device) -> torch.Tensor:
    """(n, 3, size, size) uint8 on `device`: the JPEGs decoded there in one call (nvJPEG on CUDA) and
    their boxes resized as on the CPU. A JPEG the device cannot decode is decoded on the CPU
    (libjpeg-turbo, as the CPU path does); one that neither decodes stays black, with a warning: it
    is already in its batch, where the CPU path would have skipped and counted it."""
    datas = [torch.frombuffer(bytearray(jpeg.data), dtype=torch.uint8) for jpeg in jpegs]
    try:
        pixels = decode_jpeg(datas, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:  # one bad JPEG fails the whole call: decode them one by one
        pixels = [_decoded_jpeg(data, devices=(device, torch.device("cpu"))) for data in datas]
    out = torch.zeros(len(jpegs), 3, size, size, dtype=torch.uint8, device=device)  # (n, 3, size, size)
    for i, (jpeg, image) in enumerate(zip(jpegs, pixels)):
        if image is not None and image.shape[1] >= jpeg.box[3] and image.shape[2] >= jpeg.box[2]:
            out[i] = resize_box(image.to(device), jpeg.box, size)
        else:
            log.warning("a JPEG (%d bytes) that neither %s nor the CPU decodes to its frame header's size is "
                        "left black in its batch", len(jpeg.data), device)
    return out


def _decoded_jpeg(data: torch.Tensor, *, devices: tuple[torch.device, ...]) -> torch.Tensor | None:
    """(3, H, W) uint8 decoded on the first of `devices` that can; None if none can."""
    for device in devices:
        try:
            return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
        except RuntimeError:
            continue
    return None


def _pil_crop(img: Image.Image, box: tuple[float, float, float, float], size: int) -> np.ndarray:
    """PIL decode (at reduced size for large JPEG crops) and one bicubic resize of the box."""
    width, height = img.size
    crop_min = _short_side(box)
    if img.format == "JPEG" and crop_min >= 2 * size:
        # Decode at 1/2, 1/4 or 1/8 size when the crop stays at least `size` px wide.
        img.draft(img.mode, (math.ceil(width * size / crop_min), math.ceil(height * size / crop_min)))
        fx, fy = img.size[0] / width, img.size[1] / height
        box = (box[0] * fx, box[1] * fy, box[2] * fx, box[3] * fy)
    return np.asarray(to_rgb(img).resize((size, size), Image.BICUBIC, box=box)).transpose(2, 0, 1)
