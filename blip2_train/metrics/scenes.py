"""The fine-grained synthetic scenes' caption grammar, its parser, and what it measures in generated captions.

Grammar (written by ``data/synthetic_scenes.py``; at most one object per row, objects top to bottom)::

    <count> shape[s] on a <colour> background a <size> <colour> <shape> at the top
        and a <size> <colour> <shape> in the middle and a <size> <colour> <shape> at the bottom

Metrics of generated captions against the reference (the ground truth caption parses to the truth):

- ``attr_acc/<attribute>`` (colour, shape, size, position): over every true object, the share for which the
  caption names an object at the object's position (its row, which identifies it) with the true value;
  for ``position``, an object of the true shape in the true row. ``attr_acc/background``: the share of
  captions naming the true background. ``attr_acc``: the mean of the four object attributes.
- ``count_acc``: the share of captions stating the true number of objects.
- ``hallucination`` (in the spirit of CHAIR_i): of the items a caption mentions, the share not in the
  image, summed over captions. Items: each mentioned object's shape (in the image when some object
  has that shape), its colour and its size (in the image when some object of that shape has that
  colour / size; an object of a shape the image lacks brings all three), and the background colour.
  Positions and the count are checked by the accuracies. ``hallucinated_captions`` (CHAIR_s): the
  share of captions with at least one hallucinated item.

Words the grammar does not know are ignored (neither right nor hallucinated).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

COLORS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black", "gray", "pink")
SHAPES = ("circle", "square", "triangle", "cross", "ring", "bar")
SIZES = ("small", "large")
POSITIONS = ("top", "middle", "bottom")
COUNT_WORDS = ("one", "two", "three")
ATTRIBUTES = ("color", "shape", "size", "position")

_OBJECT = re.compile(rf"\b({'|'.join(SIZES)}) ({'|'.join(COLORS)}) ({'|'.join(SHAPES)})"
                     rf"(?: (?:at|in) the ({'|'.join(POSITIONS)}))?")
_BACKGROUND = re.compile(rf"\bon a ({'|'.join(COLORS)}) background\b")
_COUNT = re.compile(rf"\b({'|'.join(COUNT_WORDS)}) shapes?\b")


def position_phrase(position: str) -> str:
    return f"in the {position}" if position == "middle" else f"at the {position}"


def scene_caption(background: str, objects: list[dict]) -> str:
    """The caption of a scene: ``objects`` (dicts with size, color, shape, position), top to bottom."""
    count = len(objects)
    head = f"{COUNT_WORDS[count - 1]} {'shape' if count == 1 else 'shapes'} on a {background} background"
    parts = [f"a {o['size']} {o['color']} {o['shape']} {position_phrase(o['position'])}" for o in objects]
    return head + " " + " and ".join(parts)


def parse_scene_caption(text: str) -> dict:
    """``{"count": int | None, "background": str | None, "objects": [{size, color, shape, position}]}``;
    a missing position is None."""
    text = " ".join(text.lower().split())
    count = _COUNT.search(text)
    background = _BACKGROUND.search(text)
    objects = [{"size": m[1], "color": m[2], "shape": m[3], "position": m[4]} for m in _OBJECT.finditer(text)]
    return {"count": COUNT_WORDS.index(count[1]) + 1 if count else None,
            "background": background[1] if background else None, "objects": objects}


def _hallucinated_items(said: dict, truth: dict) -> tuple[int, int]:
    """(items mentioned, items not in the image) of one parsed caption against the parsed truth."""
    mentioned = hallucinated = 0
    for obj in said["objects"]:
        same_shape = [o for o in truth["objects"] if o["shape"] == obj["shape"]]
        mentioned += 3
        hallucinated += (not same_shape) + all(o["color"] != obj["color"] for o in same_shape) \
            + all(o["size"] != obj["size"] for o in same_shape)
    if said["background"] is not None:
        mentioned += 1
        hallucinated += said["background"] != truth["background"]
    return mentioned, hallucinated


def scene_metrics(predictions: Mapping, references: Mapping) -> dict[str, float]:
    """Attribute / count accuracy and hallucination of ``predictions`` (id -> caption) against
    ``references`` (id -> the ground-truth caption, or a list whose first one is used)."""
    hits = dict.fromkeys(ATTRIBUTES, 0)
    objects = background_hits = count_hits = mentioned = hallucinated = bad_captions = 0
    for key, caption in predictions.items():
        reference = references[key]
        truth = parse_scene_caption(reference if isinstance(reference, str) else reference[0])
        said = parse_scene_caption(caption)
        by_row: dict[str | None, dict] = {}
        for obj in said["objects"]:
            by_row.setdefault(obj["position"], obj)  # the first object the caption puts in each row
        for obj in truth["objects"]:
            objects += 1
            guess = by_row.get(obj["position"])
            if guess is not None:
                hits["color"] += guess["color"] == obj["color"]
                hits["shape"] += guess["shape"] == obj["shape"]
                hits["size"] += guess["size"] == obj["size"]
                hits["position"] += guess["shape"] == obj["shape"]
        background_hits += said["background"] == truth["background"]
        count_hits += said["count"] == truth["count"]
        items, wrong = _hallucinated_items(said, truth)
        mentioned += items
        hallucinated += wrong
        bad_captions += wrong > 0
    captions = max(1, len(predictions))
    out = {f"attr_acc/{name}": hits[name] / max(1, objects) for name in ATTRIBUTES}
    out["attr_acc"] = sum(out[f"attr_acc/{name}"] for name in ATTRIBUTES) / len(ATTRIBUTES)
    out["attr_acc/background"] = background_hits / captions
    out["count_acc"] = count_hits / captions
    out["hallucination"] = hallucinated / max(1, mentioned)
    out["hallucinated_captions"] = bad_captions / captions
    return out
