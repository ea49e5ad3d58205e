"""Fine-grained synthetic scenes: one to three objects, some small, each with a colour, shape, size and
row, and their count; captions in the grammar of ``metrics/scenes.py``, so what a generated caption gets
right or invents is measurable.

At 64 px a small object is ~9 px across (about one 8-px patch) and a large one ~20 px; each object has
its own row (top / middle / bottom) and a random column. Horizontal flips and random crops would change
the truth (crops drop objects), so ``data=synthetic_scenes`` trains without augmentation. Each sample's
``.json`` holds the truth: ``background``, ``count`` and ``objects`` (size, colour, shape, position and
the drawn centre and radius in pixels). Written by ``data/synthetic.py``'s shard writer
(``data.synthetic.kind=scenes``).
"""

from __future__ import annotations

import random

from PIL import Image, ImageDraw

from blip2_train.data.shapes import COLORS, SHAPES
from blip2_train.data.shapes import draw_shape as _draw_shape
from blip2_train.metrics import scenes as grammar

# the parser's vocabulary is the generator's
assert tuple(COLORS) == grammar.COLORS and tuple(SHAPES) == grammar.SHAPES
SIZE_RADIUS = {"small": 0.07, "large": 0.155}  # radius / image side
ROW_CENTRE = {"top": 0.2, "middle": 0.5, "bottom": 0.8}  # y centre / image side


def _random_scene(rng: random.Random) -> tuple[str, list[dict]]:
    background = rng.choice(grammar.COLORS)
    count = rng.randint(1, len(grammar.POSITIONS))
    rows = sorted(rng.sample(range(len(grammar.POSITIONS)), count))
    objects = [{"size": rng.choice(grammar.SIZES), "color": rng.choice([c for c in grammar.COLORS if c != background]),
                "shape": rng.choice(grammar.SHAPES), "position": grammar.POSITIONS[row]} for row in rows]
    return background, objects


def random_scene_caption(rng: random.Random) -> str:
    """A scene caption without its image (to teach a tiny LLM the language)."""
    return grammar.scene_caption(*_random_scene(rng))


def render_scene(rng: random.Random, size: int) -> tuple[Image.Image, str, dict]:
    """One random scene, its caption and its truth (the sample's json)."""
    background, objects = _random_scene(rng)
    image = Image.new("RGB", (size, size), COLORS[background])
    draw = ImageDraw.Draw(image)
    for obj in objects:
        r = SIZE_RADIUS[obj["size"]] * size * rng.uniform(0.9, 1.1)
        cx = size * rng.uniform(0.2, 0.8)
        cy = size * (ROW_CENTRE[obj["position"]] + rng.uniform(-0.03, 0.03))
        _draw_shape(draw, obj["shape"], cx, cy, r, COLORS[obj["color"]])
        obj.update({"x": round(cx, 2), "y": round(cy, 2), "r": round(r, 2)})
    caption = grammar.scene_caption(background, objects)
    return image, caption, {"background": background, "count": len(objects), "objects": objects}
