"""Turning one source image into what fastload stores: a JPEG, or raw RGB pixels.

The source of truth is the image as ``datasets`` decodes it, EXIF orientation applied.
codec 'jpeg': an RGB baseline JPEG within ``max_side`` and without a rotating orientation
tag is stored byte for byte; anything else becomes an RGB baseline JPEG at ``quality``.
codec 'raw': the RGB pixels themselves, uint8 (height, width, 3), row-major: lossless.

``choose_codec`` is the 'auto' rule: raw for small images, whatever their source codec, JPEG
otherwise. Small means a longer side of at most ``RAW_MAX_SIDE`` (64 px): there raw pixels
cost at most 12 KB an image (a 32 px CIFAR image: 3 KB, about what its PNG takes, 2-3x its
JPEG), and copying them beats decoding a JPEG several times over (loading 32 px images: 2.5-2.9x
raw FFCV stored raw, 0.9x stored as JPEG). For a lossless source (CIFAR's PNGs) raw keeps the
data, where re-encoding would change it; for a small JPEG source (an image-folder copy of
CIFAR) raw stores the pixels every backend would decode from that JPEG (the same libjpeg
decode, PIL's bit for bit), so nothing is lost either. At ImageNet sizes raw would be 5-10x
the JPEG bytes on disk and in page cache, and decoding is a small part of a crop's cost.
"""
from __future__ import annotations

import io
import math
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from fastload.formats.records import DEFAULT_MAX_PIXELS
from fastload.pipelines.jpeg import JPEGDecodeError, decode_rgb, jpeg_problem

_ORIENTATION = 0x0112


class CorruptImageError(ValueError):
    """An image that does not decode; names split and index."""


def _reason(e: Exception) -> str:
    """PIL's error, without the addresses of its objects (``<_io.BytesIO object at 0x7f...>``):
    the same image gives the same words in every run and every manifest."""
    import re
    return f"{type(e).__name__}: " + re.sub(r"<([\w.]+) object at 0x[0-9a-f]+>", r"the \1 data", str(e))


RAW_MAX_SIDE = 64
CODEC_CHOICES = ("auto", "jpeg", "raw")
STATS_MIN_IMAGES, STATS_MAX_EVERY = 500, 8


@dataclass(frozen=True)
class PreparedImage:
    data: bytes      # the JPEG file, or raw RGB pixels (height * width * 3 bytes)
    height: int
    width: int
    passthrough: bool
    histogram: np.ndarray | None  # (3, 256) pixel counts of the stored image's source pixels, if asked


def source_bytes(value) -> bytes:
    """Raw bytes from a ``datasets`` Image value read with ``decode=False`` (or a PIL image)."""
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            return value["bytes"]
        if value.get("path"):
            with open(value["path"], "rb") as f:
                return f.read()
        raise CorruptImageError("image value has neither bytes nor path")
    if isinstance(value, Image.Image):
        buf = io.BytesIO()
        value.save(buf, format="PNG")
        return buf.getvalue()
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    raise CorruptImageError(f"unsupported image value of type {type(value).__name__}")


def choose_codec(sample: list[bytes], requested: str) -> str:
    """'jpeg' or 'raw' for a split, from a sample of its source images (see module doc)."""
    if requested != "auto":
        return requested
    for raw in sample:
        try:
            with Image.open(io.BytesIO(raw)) as im:
                if max(im.size) > RAW_MAX_SIDE:
                    return "jpeg"
        except Exception:  # an undecodable image: conversion names it later
            continue
    return "raw" if sample else "jpeg"


class ImageTooLargeError(CorruptImageError):
    """A source image over ``max_pixels`` that cannot be decoded smaller (named; ``--skip-corrupt`` skips it)."""


@contextmanager
def _pil_guard_off():
    """PIL's own decompression-bomb check off while a source image opens: fastload's ``max_pixels``
    is applied instead, with a reduced-size decode where the image allows one."""
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def _within_max_pixels(im: Image.Image, max_side: int | None, max_pixels: int) -> None:
    """Bring an image over ``max_pixels`` under it before it is decoded: a JPEG, with ``max_side``,
    is decoded at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling, PIL's ``draft``), no smaller than
    ``max_side`` needs; anything else is refused by name."""
    w, h = im.size
    if w * h <= max_pixels:
        return
    if max_side is not None and im.format == "JPEG":
        s = max_side / max(w, h)
        im.draft(None, (max(1, math.ceil(w * s)), max(1, math.ceil(h * s))))
        if im.size[0] * im.size[1] <= max_pixels:
            return
    how = ("a reduced-size decode is possible for JPEGs only" if max_side is not None else
           "pass --max-side N to store it downscaled (JPEGs are then decoded at a reduced size)")
    raise ImageTooLargeError(f"image is {w}x{h} ({w * h} pixels), over max_pixels={max_pixels} (a decompression-"
                             f"bomb guard): {how}, or raise --max-pixels if you trust the source")


def _plain_baseline_rgb(raw: bytes) -> tuple[int, int] | None:
    """(height, width) of a JPEG that PIL would open as a plain RGB baseline image (3 components,
    no EXIF or Adobe segment before its frame header); None for anything else, or anything this
    scan cannot be sure of, which then goes the whole way through PIL. Every length comes from
    the file: each is checked against the bytes there are."""
    n = len(raw)
    if n < 4 or raw[0] != 0xFF or raw[1] != 0xD8:
        return None
    pos = 2
    while pos + 4 <= n:
        if raw[pos] != 0xFF:
            return None
        marker = raw[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        length = raw[pos + 2] << 8 | raw[pos + 3]
        if length < 2 or pos + 2 + length > n:
            return None
        if marker in (0xC0, 0xC1):  # baseline / extended sequential frame header
            if length < 8:
                return None
            height, width = raw[pos + 5] << 8 | raw[pos + 6], raw[pos + 7] << 8 | raw[pos + 8]
            return (height, width) if raw[pos + 9] == 3 and height and width else None
        if marker in (0xE1, 0xEE) or 0xC2 <= marker <= 0xCF or marker in (0xDA, 0xD9):
            return None  # EXIF (orientation), Adobe (colour transform), another frame kind, no frame
        pos += 2 + length
    return None


def _raw_pixels_of(raw: bytes, height: int, width: int, histogram: bool) -> PreparedImage:
    """An RGB baseline JPEG stored as its pixels, decoded by the backends' own decoder (PIL's bit
    for bit); raises JPEGDecodeError where libjpeg refuses or warns."""
    pixels = decode_rgb(np.frombuffer(raw, np.uint8), height, width)
    return PreparedImage(data=pixels.tobytes(), height=height, width=width, passthrough=False,
                         histogram=_pixel_histogram(pixels) if histogram else None)


def prepare_image(raw: bytes, max_side: int | None, quality: int, codec: str = "jpeg",
                  histogram: bool = True, max_pixels: int = DEFAULT_MAX_PIXELS) -> PreparedImage:
    """What to store for one source image. A storable JPEG is judged by the backends' own
    decoder (``pipelines/jpeg.py``), in one libjpeg pass: for an image in the stats sample (see
    ``stats_every``) a full decode, whose pixels are PIL's bit for bit; for any other, a read of
    all its coded data without the pixels (``jpeg_problem``), about 60% of a decode's cost."""
    if codec == "raw" and (size := _plain_baseline_rgb(raw)) is not None and size[0] * size[1] <= max_pixels and (
            max_side is None or max(size) <= max_side):
        # a plain RGB baseline JPEG, stored as its pixels: the backends' decoder (PIL's bit for bit)
        # without PIL's Python-side parse of every segment, the larger part of a 32 px image's cost
        try:
            return _raw_pixels_of(raw, *size, histogram)
        except JPEGDecodeError:
            pass  # libjpeg warns: PIL decodes it below, as datasets shows it
    try:
        with _pil_guard_off():
            im = Image.open(io.BytesIO(raw))
        fmt = im.format
        progressive = bool(im.info.get("progressive") or im.info.get("progression"))
        orientation = im.getexif().get(_ORIENTATION, 1)
    except Exception as e:  # PIL raises many types for bad data
        raise CorruptImageError(f"image does not decode ({_reason(e)})") from None
    too_big = max_side is not None and max(im.size) > max_side
    if (fmt == "JPEG" and im.mode == "RGB" and not progressive
            and orientation in (1, None) and not too_big and im.size[0] * im.size[1] <= max_pixels):
        try:
            if codec == "raw":  # the backends' own decode, which is PIL's bit for bit, without PIL's overhead
                return _raw_pixels_of(raw, im.height, im.width, histogram)
            hist = None
            if histogram:
                hist = _histogram(Image.fromarray(decode_rgb(np.frombuffer(raw, np.uint8), im.height, im.width)))
            elif jpeg_problem(raw) is not None:
                raise JPEGDecodeError
            return PreparedImage(data=raw, height=im.height, width=im.width, passthrough=True, histogram=hist)
        except JPEGDecodeError:
            pass  # libjpeg warns (PIL may decode it anyway): PIL decodes it below, as datasets shows it
    _within_max_pixels(im, max_side, max_pixels)
    try:
        im.load()  # full decode: a truncated or garbled file fails here, not in training
    except Exception as e:
        raise CorruptImageError(f"image does not decode ({_reason(e)})") from None
    if orientation not in (1, None):
        im = ImageOps.exif_transpose(im)  # what datasets' Image feature shows users
    im = to_8bit(im)
    if im.mode != "RGB":
        im = im.convert("RGB")
    if too_big:
        w, h = im.size
        s = max_side / max(w, h)
        im = im.resize((max(1, round(w * s)), max(1, round(h * s))), Image.LANCZOS)
    if codec == "raw":
        data = im.tobytes()  # RGB, row-major: (height, width, 3) uint8
    else:
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=quality, progressive=False, optimize=False)
        data = buf.getvalue()
    return PreparedImage(data=data, height=im.height, width=im.width, passthrough=False,
                         histogram=_histogram(im) if histogram else None)


def _histogram(im: Image.Image) -> np.ndarray:
    """(3, 256) pixel counts of an RGB image."""
    return np.asarray(im.histogram(), dtype=np.int64).reshape(3, 256)


_CHANNEL_BINS = np.array([0, 256, 512], np.int32)


def _pixel_histogram(pixels: np.ndarray) -> np.ndarray:
    """:func:`_histogram` of (height, width, 3) uint8 pixels, without making a PIL image of them."""
    return np.bincount((pixels.reshape(-1, 3) + _CHANNEL_BINS).ravel(), minlength=768).reshape(3, 256).astype(np.int64)


def stats_every(num_images: int, codec: str) -> int:
    """The stats sample of a split: every k-th source index. Raw storage decodes every image
    anyway (k = 1). For JPEG storage the full decode behind a histogram is most of a stored
    JPEG's cost, so large splits sample: at least ``STATS_MIN_IMAGES`` images and at most
    every ``STATS_MAX_EVERY``-th (ImageNet's 1.28 M train images: 160 k of them), which puts
    the sample mean within about 0.005 of the full one (per-image channel means spread ~0.1)."""
    if codec == "raw":
        return 1
    return max(1, min(STATS_MAX_EVERY, num_images // STATS_MIN_IMAGES))


def to_8bit(im: Image.Image) -> Image.Image:
    """16-bit grayscale (PIL modes I;16*, or I holding 0..65535, as 16-bit PNGs open) scaled to
    8 bits (v / 257, rounded: 65535 -> 255), where PIL's own ``convert('RGB')`` would clip every
    level above 255 to white. Float images are refused by name."""
    if im.mode.startswith("I;16") or im.mode == "I":
        levels = np.asarray(im, dtype=np.int64)
        if levels.size and (levels.min() < 0 or levels.max() > 65535):
            raise CorruptImageError(f"{im.mode} image with levels outside 0..65535 is not supported: "
                                    "convert it to 8 or 16 bits per channel first")
        return Image.fromarray(((levels + 128) // 257).astype(np.uint8), mode="L")
    if im.mode == "F":
        raise CorruptImageError("32-bit float images (PIL mode F) are not supported: convert them to 8 or 16 "
                                "bits per channel first")
    return im


def stats_from_histograms(hist: np.ndarray) -> dict:
    """Per-channel mean/std in 0..1 units from summed (3, 256) histograms."""
    levels = np.arange(256, dtype=np.float64) / 255.0
    count = hist.sum(axis=1).astype(np.float64)
    mean = (hist * levels).sum(axis=1) / np.maximum(count, 1)
    var = (hist * levels ** 2).sum(axis=1) / np.maximum(count, 1) - mean ** 2
    return {"mean": [round(float(x), 6) for x in mean],
            "std": [round(float(x), 6) for x in np.sqrt(np.maximum(var, 0))],
            "pixels": int(count[0])}
