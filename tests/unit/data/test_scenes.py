"""Fine-grained synthetic scenes: the truth in each sample's json, and the caption parser's metrics
(attribute / count accuracy, hallucination) on ground-truth and hand-made captions."""

import json
import random
import tarfile

import pytest

from blip2_train.data.synthetic import write_synthetic_shards
from blip2_train.data.synthetic_scenes import random_scene_caption, render_scene
from blip2_train.metrics.scenes import parse_scene_caption, scene_metrics

TRUTH = "two shapes on a gray background a small red circle at the top and a large blue ring at the bottom"


def test_generated_captions_parse_to_the_truth_in_the_json(tmp_path):
    write_synthetic_shards(tmp_path / "set", num_train=6, num_val=4, image_size=64, samples_per_shard=10,
                           seed=3, kind="scenes")
    with tarfile.open(tmp_path / "set" / "train" / "00000.tar") as tar:
        files = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    metas = [json.loads(v) for k, v in files.items() if k.endswith(".json")]
    assert len(metas) == 6
    for meta in metas:
        assert files[f"{meta['image_id']:09d}.txt"].decode() == meta["caption"]
        parsed = parse_scene_caption(meta["caption"])
        assert parsed["count"] == meta["count"] == len(meta["objects"]) and parsed["background"] == meta["background"]
        assert parsed["objects"] == [{k: o[k] for k in ("size", "color", "shape", "position")} for o in meta["objects"]]
        assert all(o["color"] != meta["background"] for o in meta["objects"])
    rng = random.Random(0)
    counts = [render_scene(rng, 64)[2]["count"] for _ in range(60)]
    assert set(counts) == {1, 2, 3}  # all counts occur


def test_ground_truth_scores_perfectly():
    rng = random.Random(1)
    refs = {i: [random_scene_caption(rng)] for i in range(40)}
    scores = scene_metrics({i: r[0] for i, r in refs.items()}, refs)
    assert scores["hallucination"] == 0.0 and scores["hallucinated_captions"] == 0.0
    assert all(scores[k] == 1.0 for k in ("attr_acc", "attr_acc/color", "attr_acc/shape", "attr_acc/size",
                                          "attr_acc/position", "attr_acc/background", "count_acc"))


def test_wrong_colour_and_extra_object_by_hand():
    wrong_colour = TRUTH.replace("red circle", "green circle")
    extra = ("three shapes on a gray background a small red circle at the top and a small green bar in the middle "
             "and a large blue ring at the bottom")
    one = scene_metrics({0: wrong_colour}, {0: [TRUTH]})
    # 2 true objects, the top one's colour wrong; items: 2 objects x (shape, colour, size) + background = 7
    assert one["attr_acc/color"] == 0.5 and one["attr_acc/shape"] == one["attr_acc/size"] == 1.0
    assert one["attr_acc"] == pytest.approx((0.5 + 1 + 1 + 1) / 4) and one["count_acc"] == 1.0
    assert one["hallucination"] == pytest.approx(1 / 7) and one["hallucinated_captions"] == 1.0
    two = scene_metrics({0: extra}, {0: [TRUTH]})
    # the bar is not in the image: its shape, colour and size are 3 of 3 x 3 + 1 = 10 items; count wrong
    assert two["hallucination"] == pytest.approx(3 / 10) and two["count_acc"] == 0.0 and two["attr_acc"] == 1.0
    both = scene_metrics({0: wrong_colour, 1: extra, 2: "one shape on a pink background a small red circle at the "
                          "top"}, {0: [TRUTH], 1: [TRUTH], 2: [TRUTH]})
    # third: the bottom ring is missed (no object in its row), background wrong; 3 + 1 items, 1 wrong
    assert both["attr_acc/color"] == pytest.approx((1 + 2 + 1) / 6) and both["attr_acc/position"] == 5 / 6
    assert both["count_acc"] == pytest.approx(1 / 3) and both["attr_acc/background"] == pytest.approx(2 / 3)
    assert both["hallucination"] == pytest.approx((1 + 3 + 1) / (7 + 10 + 4))
    assert both["hallucinated_captions"] == 1.0


def test_unparseable_words_are_ignored():
    said = parse_scene_caption("a photo of two shapes a small red circle and a dog")
    assert said == {"count": 2, "background": None,
                    "objects": [{"size": "small", "color": "red", "shape": "circle", "position": None}]}
    scores = scene_metrics({0: "the the the"}, {0: TRUTH})
    assert scores["hallucination"] == 0.0 and scores["attr_acc"] == 0.0 and scores["count_acc"] == 0.0
