"""The shapes, colours, sizes and positions the synthetic images are drawn from (data/synthetic.py,
data/synthetic_scenes.py, data/synthetic_qa.py) and the one function that draws a shape."""

from __future__ import annotations

from PIL import ImageDraw

COLORS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 215, 40),
    "purple": (140, 50, 170), "orange": (245, 140, 30), "white": (245, 245, 245), "black": (15, 15, 15),
    "gray": (128, 128, 128), "pink": (245, 150, 200),
}


SHAPES = ("circle", "square", "triangle", "cross", "ring", "bar")


SIZES = {"small": 0.28, "large": 0.55}


POSITIONS = {"top": 0.27, "middle": 0.5, "bottom": 0.73}


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, color) -> None:
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        draw.ellipse(box, fill=color)
    elif shape == "square":
        draw.rectangle(box, fill=color)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=color)
    elif shape == "cross":
        w = r / 3
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=color)
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=color)
    elif shape == "ring":
        draw.ellipse(box, outline=color, width=max(2, int(r / 2.5)))
    elif shape == "bar":
        draw.rectangle((cx - r, cy - r / 3, cx + r, cy + r / 3), fill=color)
