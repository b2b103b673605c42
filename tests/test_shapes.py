"""The shapes world, its checker (ShapesEval), and the data it writes."""

from __future__ import annotations

import io
import json
import random
import re

import numpy as np
import pytest
from PIL import Image, ImageChops
from typer.testing import CliRunner

from openbagel.cli import app
from openbagel.shapes import world
from openbagel.shapes.eval import (
    GroundTruth,
    Item,
    evaluate,
    make_items,
    read_objects,
    read_scene,
    run_item,
    same_scene,
    score_item,
)
from openbagel.shapes.world import Obj, Scene

runner = CliRunner()


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _record_key(r: dict) -> str:
    out = {}
    for k, v in r.items():
        if isinstance(v, Image.Image):
            out[k] = _png(v).hex()
        elif isinstance(v, list):
            out[k] = [_png(x).hex() if isinstance(x, Image.Image) else x for x in v]
        else:
            out[k] = v
    return json.dumps(out, sort_keys=True)


def test_world_is_deterministic_per_seed():
    a = [_record_key(r) for r in world.WorldSource(count=30, seed=5)()]
    b = [_record_key(r) for r in world.WorldSource(count=30, seed=5)()]
    c = [_record_key(r) for r in world.WorldSource(count=30, seed=6)()]
    assert a == b
    assert a != c
    kinds = {json.loads(k)["kind"] for k in a}
    assert kinds == {"t2i", "chat", "edit", "think"}


def test_train_split_never_shows_held_out_pairs_or_relations():
    rng = random.Random(0)
    for _ in range(400):
        scenes = [world.random_scene(rng), world.counting_scene(rng), world.random_thought(rng).scene]
        edit = world.random_edit(rng, world.random_scene(rng))
        scenes += [edit.after]
        for s in scenes:
            assert all((o.color, o.shape) not in world.HELD_OUT_PAIRS for o in s.objects), s
        for cap in world.captions(world.relation_scene(rng)):
            if cap.form == "relation":
                i, rel, j = cap.request.relations[0]
                key = (cap.request.objects[i].shape, rel, cap.request.objects[j].shape)
                assert key not in world.HELD_OUT_RELATIONS
        for frame in world.random_clip(rng).frames:
            assert all((m.color, m.shape) not in world.HELD_OUT_PAIRS for m in frame)
        for q, _, _ in world.questions(world.random_scene(rng), rng):
            assert not any(f"{c} {sh}" in q for c, sh in world.HELD_OUT_PAIRS), q
            assert not any(f"{a} {rel} the " in q and q.endswith(f" {b}?") for a, rel, b in world.HELD_OUT_RELATIONS), q
    held = world.held_out_scene(rng)
    assert any((o.color, o.shape) in world.HELD_OUT_PAIRS for o in held.objects)


def test_split_all_shows_every_pair_and_relation():
    """The shipped model's data (split all) holds the held-out pairs and
    relations too; the train split never does (above)."""
    pairs, relations = set(), set()
    for record in world.WorldSource(count=3000, seed=0, split="all", tasks=("t2i",), unspecified="default")():
        caption = record["caption"]
        pairs |= {(c, sh) for c, sh in world.HELD_OUT_PAIRS if f"{c} {sh}" in caption}
        relations |= {(a, r, b) for a, r, b in world.HELD_OUT_RELATIONS if re.search(rf"{a} {r} an? \w+ {b}$", caption)}
    assert pairs == set(world.HELD_OUT_PAIRS)
    assert relations == set(world.HELD_OUT_RELATIONS)


def test_captions_and_questions_describe_the_scene():
    scene = Scene(
        (Obj("circle", "red", "small", (0, 0)), Obj("square", "blue", "large", (2, 2))),
        "gray",
    )
    caps = {c.form: c for c in world.captions(scene)}
    assert caps["full"].text == "a small red circle in the top left and a large blue square in the bottom right"
    assert caps["full+background"].text.endswith("on a gray background")
    relation_texts = {c.text for c in world.captions(scene) if c.form == "relation"}
    assert relation_texts == {"a red circle left of a blue square", "a red circle above a blue square"}
    for c in world.captions(scene):
        assert c.request.satisfied_by(scene), c.text
    moved = Scene((Obj("circle", "red", "small", (2, 0)), scene.objects[1]), "gray")
    assert not caps["full"].request.satisfied_by(moved)
    assert {c.text for c in world.captions(moved) if c.form == "relation"} == {"a red circle left of a blue square"}
    qa = {q: a for q, a, _ in world.questions(scene, random.Random(0))}
    assert qa["What colour is the circle?"] == "red"
    assert qa["What shape is the blue object?"] == "square"
    assert qa["Where is the blue square?"] == "bottom right"
    assert qa["How many objects are there?"] == "two"
    assert qa["What colour is the background?"] == "gray"
    three = Scene(tuple(Obj("triangle", "green", "small", (0, c)) for c in range(3)), "white")
    assert "three green triangles" in {c.text for c in world.captions(three)}


def test_default_scene_puts_what_a_caption_leaves_out_at_its_default():
    scene = Scene((Obj("circle", "red", "small", (2, 2)), Obj("square", "blue", "small", (0, 0))), "white")
    caps = {c.text: c for c in world.captions(scene)}
    below = world.default_scene(scene, caps["a red circle below a blue square"])
    assert below == Scene((Obj("circle", "red", "large", (2, 1)), Obj("square", "blue", "large", (0, 1))), "gray")
    right = world.default_scene(scene, caps["a red circle right of a blue square"])
    assert [o.cell for o in right.objects] == [(1, 2), (1, 0)]
    full = caps["a small red circle in the bottom right and a small blue square in the top left"]
    assert world.default_scene(scene, full) == Scene(scene.objects, "gray")  # positions and sizes named
    named = caps[full.text + " on a white background"]
    assert world.default_scene(scene, named) == scene
    one = Scene((Obj("triangle", "pink", "small", (0, 2)),), "black")
    short = next(c for c in world.captions(one) if c.form == "short")
    assert world.default_scene(one, short) == Scene((Obj("triangle", "pink", "small", (1, 1)),), "gray")
    three = Scene(tuple(Obj("diamond", "green", "small", (2, c)) for c in range(3)), "white")
    count = next(c for c in world.captions(three) if c.form == "count")
    assert [(o.cell, o.size) for o in world.default_scene(three, count).objects] == [
        ((1, 0), "large"),
        ((1, 1), "large"),
        ((1, 2), "large"),
    ]
    rng = random.Random(3)  # every default picture still fulfils its caption, read back from the image
    for _ in range(150):
        s = rng.choice((world.random_scene, world.counting_scene, world.relation_scene))(rng)
        for cap in world.captions(s):
            assert cap.request.satisfied_by(read_scene(world.render(world.default_scene(s, cap)))), cap.text


def test_records_with_default_layouts():
    rng = random.Random(0)
    records = [world.make_record("t2i", rng, unspecified="default") for _ in range(200)]
    for r in records:  # one caption, and the one picture it describes
        assert isinstance(r["caption"], str)
    shorts = [r for r in records if len(r["caption"].split()) == 4]  # "a small red circle"
    assert shorts and all(read_scene(r["image"]).objects[0].cell == (1, 1) for r in shorts)
    assert all(read_scene(r["image"]).background == "gray" for r in records if "background" not in r["caption"])
    think = world.make_record("think", random.Random(1), unspecified="default")
    assert read_scene(think["image"]).background == "gray"
    assert isinstance(world.make_record("t2i", random.Random(0))["caption"], list)  # the default: random
    with pytest.raises(ValueError, match="'random' or 'default'"):
        world.WorldSource(unspecified="centre")
    with pytest.raises(ValueError, match="'random' or 'default'"):
        world.make_record("t2i", rng, unspecified="centre")


def test_articles_and_bad_world_arguments():
    scene = Scene((Obj("square", "orange", "small", (0, 0)), Obj("square", "red", "small", (0, 2))), "white")
    assert "an orange square left of a red square" in {c.text for c in world.captions(scene)}
    for bad in (
        {"count": 0},
        {"tasks": "t2i"},
        {"tasks": []},
        {"tasks": ["t2i", "qa"], "weights": (float("inf"), 1.0)},
        {"weights": ("1",) * 6},
        {"seed": None},
        {"size": 0},
        {"split": "val"},
    ):
        with pytest.raises(ValueError):
            world.WorldSource(**bad)
    with pytest.raises(ValueError, match="at least 16"):
        world.render(scene, 0)


def test_edits_change_only_what_they_say():
    rng = random.Random(3)
    seen = set()
    for _ in range(200):
        before = world.random_scene(rng, num_objects=2)
        e = world.random_edit(rng, before)
        seen.add(e.kind)
        changed = set(map(repr, before.objects)) ^ set(map(repr, e.after.objects))
        if e.kind in ("recolor", "move"):
            assert len(changed) == 2 and len(e.after.objects) == 2
        elif e.kind == "remove":
            assert len(e.after.objects) == 1 and changed
        elif e.kind == "add":
            assert len(e.after.objects) == 3
        elif e.kind == "background":
            assert e.after.background != before.background and not changed
        else:
            assert e.style in world.STYLES and e.after == before
    assert seen == {"recolor", "move", "remove", "add", "background", "style"}


def test_clips_bounce_at_constant_speed():
    clip = world.random_clip(random.Random(7))
    assert 4 <= len(clip.frames) <= 6
    for a, b in zip(clip.frames, clip.frames[1:]):
        for m, n in zip(a, b):
            assert (abs(n.vx), abs(n.vy)) == (abs(m.vx), abs(m.vy))
            r = world.half_extent(n.size)
            assert r <= n.x <= world.IMAGE_SIZE - r and r <= n.y <= world.IMAGE_SIZE - r
    m = world.Mover("square", "red", "large", 60.0, 30.0, 4.0, 0.0)  # 8 px from the right wall
    n = world.step_mover(m)
    assert (n.x, n.vx) == (2 * (64 - 8) - 64.0, -4.0)


def test_reader_reads_every_shape_colour_size_and_cell():
    for shape in world.SHAPES:
        for color in world.COLORS:
            for size in world.SIZES:
                for bg in world.BACKGROUNDS:
                    scene = Scene((Obj(shape, color, size, (1, 2)), Obj("circle", color, "large", (0, 0))), bg)
                    assert same_scene(read_scene(world.render(scene)), scene), (shape, color, size, bg)


def test_reader_reads_any_size_and_refuses_empty_images():
    from openbagel.errors import InvalidInputError

    scene = Scene((Obj("triangle", "purple", "large", (2, 1)), Obj("diamond", "yellow", "small", (0, 0))), "black")
    for size in (48, 96, 256):
        assert same_scene(read_scene(world.render(scene, size)), scene), size
    clear = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    assert read_scene(clear) == Scene((), "white")  # transparency is composited on white
    with pytest.raises(InvalidInputError, match="empty"):
        read_scene(Image.new("RGB", (0, 0)))


def test_checker_scores_ground_truth_at_one():
    items = make_items(per_task=25)
    scores = evaluate(GroundTruth(), items)
    tasks = {"t2i", "t2i_heldout", "qa", "edit", "style", "next_frame", "think"}
    groups = {f"{t}.{g}" for t in ("t2i", "t2i_heldout") for g in ("one", "relation", "count", "many")}
    assert set(scores) == tasks | groups | {"overall"}
    assert all(v >= 0.98 for v in scores.values()), scores
    heldout = [i for i in items if i.task == "t2i_heldout"]
    assert all(
        any((s.color, s.shape) in world.HELD_OUT_PAIRS for s in i.request.objects)
        or any(
            (i.request.objects[a].shape, rel, i.request.objects[b].shape) in world.HELD_OUT_RELATIONS
            for a, rel, b in i.request.relations
        )
        for i in heldout
    )
    assert {len(i.request.objects) for i in items if i.group == "one"} == {1}


def test_checker_tolerates_mild_noise():
    rng = np.random.default_rng(0)
    items = [i for i in make_items(per_task=20) if i.task in ("t2i", "edit", "next_frame", "think")]
    ok = 0
    for item in items:
        img = np.asarray(run_item(GroundTruth(), item), dtype=np.float32)
        noisy = np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)
        ok += score_item(item, Image.fromarray(noisy))
    assert ok / len(items) >= 0.95


def _recolor_one(item: Item) -> Image.Image:
    scene = read_scene(item.target_image)
    o = scene.objects[0]
    new = next(c for c in world.COLORS if c != o.color)
    return world.render(Scene((Obj(o.shape, new, o.size, o.cell), *scene.objects[1:]), scene.background))


def _drop_one(item: Item) -> Image.Image:
    scene = read_scene(item.target_image)
    return world.render(Scene(scene.objects[1:], scene.background))


def _shift(item: Item) -> Image.Image:
    return ImageChops.offset(item.target_image, world.IMAGE_SIZE // 3, 0)


def _noise(item: Item) -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))


@pytest.mark.parametrize(
    "corrupt,tasks,most",
    [
        (_recolor_one, ("t2i", "edit", "think"), 0.25),  # some requests leave colour free
        (_drop_one, ("t2i", "edit", "think"), 0.0),
        (_shift, ("edit", "next_frame"), 0.1),
        (_noise, ("t2i", "edit", "next_frame", "think"), 0.0),
    ],
)
def test_checker_scores_corrupted_images_low(corrupt, tasks, most):
    items = [i for i in make_items(per_task=20) if i.task in tasks and i.style is None]
    right = sum(score_item(i, corrupt(i)) for i in items)
    assert right / len(items) <= most, (corrupt.__name__, right, len(items))


def test_wrong_answers_and_styles_fail():
    items = make_items(per_task=10)
    qa = [i for i in items if i.task == "qa"]
    assert all(score_item(i, i.answer.upper() + ".") for i in qa)  # case and full stop ignored
    assert not any(score_item(i, "purple elephant") for i in qa)
    style = [i for i in items if i.task == "style"]
    assert not any(score_item(i, i.images[0]) for i in style if i.target.objects)  # unstyled input


def test_next_frame_positions_are_read_to_a_pixel():
    clip = world.random_clip(random.Random(11))
    found, _ = read_objects(clip.render(2))
    for m in clip.frames[2]:
        d = next(d for d in found if d.obj.color == m.color)
        assert abs(d.x - m.x) <= 1 and abs(d.y - m.y) <= 1 and d.obj.shape == m.shape


def test_eval_cli(tmp_path):
    out = tmp_path / "scores.json"
    r = runner.invoke(app, ["eval", "shapes", "--ground-truth", "--items", "3", "--json", str(out)])
    assert r.exit_code == 0, r.output
    lines = {line.split()[0]: line.split()[1] for line in r.output.splitlines()[1:] if line.strip()}
    assert lines["t2i_heldout"] == lines["overall"] == "1.000" and "t2i.relation" in lines
    data = json.loads(out.read_text())
    assert data["scores"]["overall"] == 1.0 and data["items_per_task"] == 3


def test_eval_cli_runs_a_model(tiny_dir):
    """A random model scores (about) nothing, but every task runs end to end."""
    r = runner.invoke(app, ["eval", "shapes", "--model", str(tiny_dir), "--items", "1"])
    assert r.exit_code == 0, r.output
    assert "next_frame" in r.output and "think" in r.output


def test_written_data_loads_in_the_trainer(tmp_path, tiny_dir):
    from openbagel.config import preset
    from openbagel.tokenizer import Tokenizer
    from openbagel.train.data import SampleBuilder, read_conversations, read_edit, read_text_to_image

    r = runner.invoke(app, ["data", "shapes", str(tmp_path / "d"), "--count", "6"])
    assert r.exit_code == 0, r.output
    again = runner.invoke(app, ["data", "shapes", str(tmp_path / "d"), "--count", "2"])
    assert again.exit_code == 2 and "not an empty folder" in again.output
    builder = SampleBuilder(preset("tiny-golden"), Tokenizer.from_folder(tiny_dir))
    rng = random.Random(0)
    assert len(list(read_text_to_image(tmp_path / "d" / "t2i.parquet", builder, rng))) == 6
    edits = list(read_edit(tmp_path / "d" / "edit.parquet", builder, rng))
    assert len(edits) == 6 and len(edits[2]) > len(edits[0])  # the third is a clip of 4-6 frames
    assert len(list(read_conversations(tmp_path / "d" / "chat.jsonl", builder))) == 6
