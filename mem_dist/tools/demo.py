"""LAION-style demo shards: compositional scenes with captions, in img2dataset's layout.

A scene is one or two shapes (8 kinds x 12 colours x 2 sizes x 9 positions) on a
background (5 patterns x 12 colours), drawn with jitter and sensor noise and stored as
JPEG (quality 95, as img2dataset). Captions describe every attribute through varied
templates, so a small CLIP trained from scratch on a few thousand pairs learns real
image-text retrieval. ``named_colours=False`` (``mem-dist demo-data --no-colours``) draws
the same scenes with captions that never name a colour: harder content. Output per split:
``00000.tar`` ... with 9-digit keys and ``KEY.jpg`` / ``KEY.txt`` / ``KEY.json`` members,
plus ``00000.parquet`` and ``00000_stats.json`` beside each tar, as img2dataset writes them.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from mem_dist.pipeline import storage
from mem_dist.tools.shards import write_shards

COLOURS = {
    "red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 60, 220), "yellow": (240, 220, 40),
    "purple": (130, 40, 170), "orange": (245, 140, 20), "pink": (245, 130, 190), "cyan": (40, 210, 220),
    "white": (245, 245, 245), "black": (15, 15, 15), "brown": (120, 70, 30), "gray": (128, 128, 128),
}
SHAPES = ("circle", "square", "triangle", "star", "cross", "ring", "diamond", "heart")
SIZES = ("small", "large")
POSITIONS = {  # name -> (column, row) on a 3x3 grid
    "top left": (0, 0), "top": (1, 0), "top right": (2, 0),
    "left": (0, 1), "center": (1, 1), "right": (2, 1),
    "bottom left": (0, 2), "bottom": (1, 2), "bottom right": (2, 2),
}
BACKGROUNDS = ("plain", "striped", "checkered", "dotted", "gradient")

POSITION_PHRASES = {
    "top left": "in the top left corner", "top": "at the top", "top right": "in the top right corner",
    "left": "on the left", "center": "in the middle", "right": "on the right",
    "bottom left": "in the bottom left corner", "bottom": "at the bottom", "bottom right": "in the bottom right corner",
}
ONE_OBJECT = (
    "a {size} {colour} {shape} {where} on a {bg} background",
    "a photo of a {colour} {shape} {where}, {bg} background",
    "{bg} background with a {size} {colour} {shape} {where}",
    "there is a {size} {colour} {shape} {where} over a {bg} backdrop",
    "{size} {colour} {shape}, {where}, {bg} background",
)
# Captions without colours (``named_colours=False``): colours are drawn as before but never
# named, so only shape, size, position and background pattern tie a caption to its image.
ONE_OBJECT_SHAPE = (
    "a {size} {shape} {where} on a {bg} background",
    "a photo of a {shape} {where}, {bg} background",
    "{bg} background with a {size} {shape} {where}",
    "there is a {size} {shape} {where} over a {bg} backdrop",
    "{size} {shape}, {where}, {bg} background",
)
TWO_OBJECTS_SHAPE = (
    "a {size} {shape} {where} and a {size2} {shape2} {where2} on a {bg} background",
    "a {shape} {where} next to a {shape2} {where2}, {bg} background",
    "{bg} background with a {shape} {where} and a {shape2} {where2}",
)
TWO_OBJECTS = (
    "a {size} {colour} {shape} {where} and a {size2} {colour2} {shape2} {where2} on a {bg} background",
    "a {colour} {shape} {where} next to a {colour2} {shape2} {where2}, {bg} background",
    "{bg} background with a {colour} {shape} {where} and a {colour2} {shape2} {where2}",
)


@dataclass(frozen=True)
class Thing:
    shape: str
    colour: str
    size: str
    position: str


def _draw_shape(draw: ImageDraw.ImageDraw, thing: Thing, cx: float, cy: float, r: float, angle: float) -> None:
    fill = COLOURS[thing.colour]
    if thing.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif thing.shape == "ring":
        w = max(2.0, r * 0.4)
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fill, width=int(round(w)))
    elif thing.shape == "cross":
        w = r * 0.38
        pts1 = _rotate([(-r, -w), (r, -w), (r, w), (-r, w)], cx, cy, angle)
        pts2 = _rotate([(-w, -r), (w, -r), (w, r), (-w, r)], cx, cy, angle)
        draw.polygon(pts1, fill=fill)
        draw.polygon(pts2, fill=fill)
    elif thing.shape == "heart":
        pts = [(16 * math.sin(t) ** 3, -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)))
               for t in np.linspace(0, 2 * math.pi, 40)]
        pts = [(x * r / 17, y * r / 17) for x, y in pts]
        draw.polygon(_rotate(pts, cx, cy, angle), fill=fill)
    else:
        n, inner = {"square": (4, None), "triangle": (3, None), "diamond": (4, None), "star": (5, 0.45)}[thing.shape]
        base = {"square": math.pi / 4, "triangle": -math.pi / 2, "diamond": 0.0, "star": -math.pi / 2}[thing.shape]
        pts = []
        for i in range(n * (2 if inner else 1)):
            rr = r if (inner is None or i % 2 == 0) else r * inner
            a = base + angle + i * math.pi / (n if inner else n / 2)
            pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
        draw.polygon(pts, fill=fill)


def _rotate(pts: list[tuple[float, float]], cx: float, cy: float, angle: float) -> list[tuple[float, float]]:
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts]


def _background(rng: np.random.Generator, size: int, pattern: str, colour: str) -> Image.Image:
    base = np.array(COLOURS[colour], dtype=np.float32)
    other = base * 0.55 + 255 * 0.45 if base.mean() < 128 else base * 0.6
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    period = rng.uniform(size / 8, size / 4)
    phase = rng.uniform(0, period)
    if pattern == "plain":
        mask = np.zeros((size, size), np.float32)
    elif pattern == "striped":
        coord = xx if rng.random() < 0.5 else yy
        mask = ((coord + phase) % period < period / 2).astype(np.float32)
    elif pattern == "checkered":
        mask = (((xx + phase) // (period / 2) + (yy + phase) // (period / 2)) % 2).astype(np.float32)
    elif pattern == "dotted":
        dx = (xx + phase) % period - period / 2
        dy = (yy + phase) % period - period / 2
        mask = (dx * dx + dy * dy < (period / 5) ** 2).astype(np.float32)
    else:  # gradient
        t = rng.uniform(0, 2 * math.pi)
        mask = ((xx * math.cos(t) + yy * math.sin(t)) / size * 0.7 + 0.5).clip(0, 1)
    img = base[None, None] * (1 - mask[..., None]) + other[None, None] * mask[..., None]
    return Image.fromarray(img.clip(0, 255).astype(np.uint8))


def render_scene(rng: np.random.Generator, size: int, named_colours: bool = True) -> tuple[Image.Image, str, dict]:
    """Draw one random scene; returns the image, its caption and its attributes.

    ``named_colours=False`` leaves colours out of the caption (and "plain" backgrounds are
    called plain): the image's strongest, linearly readable signal then says nothing about
    the caption, and a CLIP has to learn shapes, as it has to on real photos."""
    n_objects = 1 if rng.random() < 0.6 else 2
    positions = rng.choice(list(POSITIONS), size=n_objects, replace=False)
    colours = list(COLOURS)
    things = [Thing(str(rng.choice(SHAPES)), str(rng.choice(colours)), str(rng.choice(SIZES)), str(p)) for p in positions]
    bg_colour = str(rng.choice([c for c in colours if c not in {t.colour for t in things}]))
    bg_pattern = str(rng.choice(BACKGROUNDS))
    img = _background(rng, size, bg_pattern, bg_colour)
    draw = ImageDraw.Draw(img)
    cell = size / 3
    for t in things:
        col, row = POSITIONS[t.position]
        r = cell * (0.45 if t.size == "large" else 0.27)
        cx = (col + 0.5) * cell + rng.uniform(-0.12, 0.12) * cell
        cy = (row + 0.5) * cell + rng.uniform(-0.12, 0.12) * cell
        _draw_shape(draw, t, cx, cy, r, float(rng.uniform(-0.3, 0.3)))
    arr = np.asarray(img, dtype=np.float32) + rng.normal(0, 4.0, (size, size, 3))
    img = Image.fromarray(arr.clip(0, 255).astype(np.uint8))
    if named_colours:
        bg = f"{bg_colour} {bg_pattern}" if bg_pattern != "plain" else bg_colour
    else:
        bg = bg_pattern
    one, two = (ONE_OBJECT, TWO_OBJECTS) if named_colours else (ONE_OBJECT_SHAPE, TWO_OBJECTS_SHAPE)
    t0 = things[0]
    fields = dict(size=t0.size, colour=t0.colour, shape=t0.shape, where=POSITION_PHRASES[t0.position], bg=bg)
    if n_objects == 1:
        caption = str(rng.choice(one)).format(**fields)
    else:
        t1 = things[1]
        fields.update(size2=t1.size, colour2=t1.colour, shape2=t1.shape, where2=POSITION_PHRASES[t1.position])
        caption = str(rng.choice(two)).format(**fields)
    caption = re.sub(r"\ba ([aeiou])", r"an \1", caption)
    attrs = {"objects": [t.__dict__ for t in things], "background": {"pattern": bg_pattern, "colour": bg_colour}}
    return img, caption, attrs


def write_split(out: str, n_samples: int, per_shard: int, size: int, seed: int, named_colours: bool = True) -> list[str]:
    """Write ``n_samples`` scenes as img2dataset-style shards under ``out`` (see
    :func:`mem_dist.tools.shards.write_shards`); shard i draws its scenes from the RNG [seed, i].

    Returns:
        The URLs of the tar shards written.
    """

    def scenes():
        for shard_id in range(max(1, math.ceil(n_samples / per_shard))):
            rng = np.random.default_rng([seed, shard_id])
            for _ in range(min(per_shard, n_samples - shard_id * per_shard)):
                img, caption, attrs = render_scene(rng, size, named_colours)
                yield img, caption, {"scene": attrs}

    return write_shards(out, scenes(), per_shard, url_base="https://demo.mem-dist.invalid")


def make_demo_data(out: str, train: int, val: int, size: int = 64, per_shard: int = 500, seed: int = 0,
                   named_colours: bool = True) -> dict[str, list[str]]:
    """Write ``out/train`` and ``out/val`` demo shards; returns the shard URLs per split."""
    return {
        "train": write_split(storage.join(out, "train"), train, per_shard, size, seed, named_colours),
        "val": write_split(storage.join(out, "val"), val, per_shard, size, seed + 1_000_003, named_colours),
    }
