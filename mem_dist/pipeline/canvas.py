"""Source images: opening untrusted bytes safely and turning them into the canvas.

Only the Pillow formats that ``data.image_keys`` names are ever tried (jpg / jpeg -> JPEG,
png -> PNG, webp -> WEBP, ...: never EPS, which Pillow hands to Ghostscript), and an image
with more pixels than ``data.max_pixels`` is refused from its header, before any decoding.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from mem_dist.pipeline.config import IMAGE_FORMATS, DataConfig

# data.max_pixels replaces Pillow's own warning threshold (its hard limit, 2x, stays).
warnings.simplefilter("ignore", Image.DecompressionBombWarning)


def allowed_formats(image_keys) -> tuple[str, ...]:
    """The Pillow formats the image keys name (jpg -> JPEG, ...): the only decoders tried."""
    return tuple(sorted({f for k in image_keys for f in IMAGE_FORMATS[k.lower()]}))


def sniff_format(raw: bytes) -> str | None:
    """The Pillow format whose signature the bytes start with (nothing is parsed), or None."""
    Image.init()
    head = raw[:64]
    for name, (_, accept) in Image.OPEN.items():
        try:
            if accept is not None and accept(head):
                return name
        except Exception:  # an accept function that wants more bytes
            continue
    return None


def decode(raw: bytes, cfg: DataConfig) -> tuple[np.ndarray | None, str | None]:
    """(canvas, None), or (None, the skip reason): only the formats ``data.image_keys``
    names are opened, and an image over ``data.max_pixels`` is never decoded."""
    formats = allowed_formats(cfg.image_keys)
    try:
        with Image.open(io.BytesIO(raw), formats=list(formats)) as img:
            if img.width * img.height > cfg.max_pixels:
                return None, "image_too_large"
            img.load()
            canvas = to_canvas(img, cfg.image_size, cfg.resize_mode)
    except Image.DecompressionBombError:  # over Pillow's own hard limit
        return None, "image_too_large"
    except UnidentifiedImageError:
        found = sniff_format(raw)
        return None, "unsupported_format" if found is not None and found not in formats else "decode_error"
    except Exception:  # PIL raises many types for bad bytes
        return None, "decode_error"
    return (None, "wrong_size") if canvas is None else (canvas, None)


def to_canvas(img: Image.Image, size: int, mode: str) -> np.ndarray | None:
    """A source image as the canvas, uint8 [size, size, 3]; None if mode "no" and the
    image has the wrong size.

    Any image mode becomes RGB as :func:`as_rgb` shows it.
    center_crop: shorter side to ``size`` (bicubic), centre crop.
    border: longer side to ``size`` (bicubic), pad with white to a square.
    no: as it is.
    """
    img = as_rgb(img)
    w, h = img.size
    if mode == "no":
        return np.asarray(img, dtype=np.uint8).copy() if (w, h) == (size, size) else None
    if mode == "center_crop":
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        if (nw, nh) != (w, h):
            img = img.resize((nw, nh), Image.BICUBIC)
        left, top = (nw - size) // 2, (nh - size) // 2
        img = img.crop((left, top, left + size, top + size))
    else:  # border
        scale = size / max(w, h)
        nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
        if (nw, nh) != (w, h):
            img = img.resize((nw, nh), Image.BICUBIC)
        board = Image.new("RGB", (size, size), (255, 255, 255))
        board.paste(img, ((size - nw) // 2, (size - nh) // 2))
        img = board
    return np.asarray(img, dtype=np.uint8).copy()


def as_rgb(img: Image.Image) -> Image.Image:
    """RGB as the image is shown.

    - Turned upright by its EXIF orientation, as browsers and viewers show it (the
      protected image carries no EXIF, so a phone photo would otherwise be stored on its side).
    - Transparent pixels over white, as img2dataset does (a plain convert keeps whatever
      colour hides under them, often black).
    - 16-bit and float greyscale scaled to 8 bits (a plain convert clips them to white).
    """
    img = upright(img)
    if img.mode in HIGH_DEPTH_MODES:
        return Image.fromarray(to_8bit(img)).convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", img.size, (255, 255, 255, 255)), img).convert("RGB")
    return img.convert("RGB")


HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def upright(img: Image.Image) -> Image.Image:
    """The image rotated / flipped by its EXIF orientation tag; as it is if it has none
    or the tag cannot be read."""
    try:
        return ImageOps.exif_transpose(img)
    except Exception:  # malformed EXIF: the pixels are still good
        return img


def to_8bit(img: Image.Image) -> np.ndarray:
    """A high-bit-depth greyscale image as uint8: 16-bit modes (and 32-bit integer or
    float ones holding values above 255) by 1/257, float in [0, 1] by 255, clipped."""
    a = np.nan_to_num(np.asarray(img, dtype=np.float64))
    if img.mode.startswith("I;16") or a.max(initial=0) > 255:
        a = a / 257
    elif img.mode == "F" and a.max(initial=0) <= 1:
        a = a * 255
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)
