"""Small scenes of coloured shapes: sampling, rendering to RGB images, and spoken-style captions."""

import math
from dataclasses import asdict, dataclass
from typing import List, Tuple

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {
    "red": (210, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "purple": (140, 60, 170),
    "orange": (245, 140, 30),
    "black": (20, 20, 20),
    "white": (250, 250, 250),
}
SHAPES = ("circle", "square", "triangle", "star")
SIZES = {"small": 0.14, "big": 0.24}  # radius as a fraction of the image side
BACKGROUND = (150, 150, 150)


@dataclass(frozen=True)
class SceneObject:
    colour: str
    shape: str
    size: str
    x: float  # centre, fraction of width (0 left, 1 right)
    y: float  # centre, fraction of height (0 top, 1 bottom)


@dataclass(frozen=True)
class Scene:
    image_id: str
    objects: Tuple[SceneObject, ...]

    def to_json(self) -> dict:
        return {"image": self.image_id, "objects": [asdict(o) for o in self.objects]}


def sample_scene(rng: np.random.Generator, image_id: str) -> Scene:
    """Two objects of different (colour, shape), far enough apart that one relation is clear."""
    while True:
        objs = []
        for _ in range(2):
            size = str(rng.choice(list(SIZES)))
            r = SIZES[size]
            objs.append(
                SceneObject(
                    colour=str(rng.choice(list(COLOURS))),
                    shape=str(rng.choice(SHAPES)),
                    size=size,
                    x=float(rng.uniform(r, 1 - r)),
                    y=float(rng.uniform(r, 1 - r)),
                )
            )
        a, b = objs
        if (a.colour, a.shape) == (b.colour, b.shape):
            continue
        dx, dy = b.x - a.x, b.y - a.y
        if max(abs(dx), abs(dy)) < SIZES[a.size] + SIZES[b.size] + 0.02:
            continue
        if abs(abs(dx) - abs(dy)) < 0.1:  # ambiguous diagonal
            continue
        return Scene(image_id, tuple(objs))


def relation(a: SceneObject, b: SceneObject) -> str:
    """Where ``a`` is with respect to ``b``, along the dominant axis."""
    dx, dy = a.x - b.x, a.y - b.y
    if abs(dx) >= abs(dy):
        return "to the left of" if dx < 0 else "to the right of"
    return "above" if dy < 0 else "below"


def _polygon(shape: str, cx: float, cy: float, r: float) -> List[Tuple[float, float]]:
    if shape == "triangle":
        return [(cx + r * math.cos(t), cy + r * math.sin(t)) for t in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else r * 0.45
            t = -math.pi / 2 + k * math.pi / 5
            pts.append((cx + rad * math.cos(t), cy + rad * math.sin(t)))
        return pts
    raise ValueError(shape)


def render_scene(scene: Scene, side: int = 64) -> Image.Image:
    img = Image.new("RGB", (side, side), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        cx, cy, r = o.x * side, o.y * side, SIZES[o.size] * side
        fill = COLOURS[o.colour]
        if o.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif o.shape == "square":
            s = r * 0.85
            draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
        else:
            draw.polygon(_polygon(o.shape, cx, cy, r), fill=fill)
    return img


def _np(o: SceneObject, with_size: bool) -> str:
    return f"{o.size} {o.colour} {o.shape}" if with_size else f"{o.colour} {o.shape}"


def caption_templates(scene: Scene) -> List[str]:
    """Every caption wording for a scene; callers sample from these."""
    a, b = scene.objects
    rel_ab, rel_ba = relation(a, b), relation(b, a)
    return [
        f"a {_np(a, True)} {rel_ab} a {_np(b, True)}",
        f"a {_np(b, True)} {rel_ba} a {_np(a, True)}",
        f"there is a {_np(a, False)} {rel_ab} a {_np(b, False)}",
        f"a picture of a {_np(b, False)} and a {_np(a, False)}",
        f"the {_np(a, False)} is {rel_ab} the {_np(b, False)}",
        f"i see a {_np(b, True)} {rel_ba} a {_np(a, False)}",
    ]
