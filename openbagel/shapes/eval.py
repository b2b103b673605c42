"""ShapesEval: score any model on the shapes world by reading its images back.

The reader (:func:`read_scene`) snaps every pixel to the nearest world
colour, finds each colour's connected components, classifies each
component's shape by its overlap with the four shape templates drawn in its
bounding box, and its size and grid cell from the box. Scores are the
fraction of fixed, seeded items a model gets entirely right, per task:

* ``t2i`` / ``t2i_heldout``: the image fulfils the caption's :class:`~openbagel.shapes.world.Request`
  (every requested object, colour, count, position, relation; nothing else);
  the held-out split uses colour-shape pairs and relations never trained on;
* ``qa``: the answer equals the true one (case and final full stop ignored);
* ``edit``: the image reads back as the edited scene (the rest unchanged);
* ``style``: outline and inverted scenes read back (after filling outlines or
  inverting back) as the scene; pixel art matches the target block by block;
* ``next_frame``: every object within 3 px (at 64 px) of its true position;

Images of another size are read after resizing them to 64x64.
* ``think``: the image fulfils the under-specified request.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

from openbagel.shapes import world
from openbagel.shapes.world import BACKGROUNDS, COLORS, SHAPES, Obj, Scene

#: A pixel further than this (RGB Euclidean) from every world colour is left unassigned.
MAX_COLOR_DISTANCE = 90.0
#: Components smaller than this fraction of a small object's box are noise.
MIN_AREA_FRACTION = 0.2
#: Next-frame tolerance in pixels at 64 px (scaled with the image).
POSITION_TOLERANCE = 3.0


@dataclass(frozen=True)
class Detected:
    """One object read back from an image: the scene object (with its grid
    cell) and its box centre ``(x, y)`` in pixels."""

    obj: Obj
    x: float
    y: float
    iou: float
    solidity: float = 1.0  # drawn pixels / pixels inside the outline (1 for filled shapes)


def _palette(background: str) -> tuple[list[str], np.ndarray]:
    names = [*COLORS, f"bg:{background}"]
    values = np.array([*COLORS.values(), BACKGROUNDS[background]], dtype=np.float32)
    return names, values


def read_background(img: np.ndarray) -> str:
    """The world background closest to the image's most common colour."""
    flat = img.reshape(-1, 3)
    colors, counts = np.unique((flat // 16).astype(np.int32), axis=0, return_counts=True)
    mode = flat[np.all(flat // 16 == colors[counts.argmax()], axis=1)].mean(axis=0)
    names = list(BACKGROUNDS)
    dist = [np.linalg.norm(mode - np.array(BACKGROUNDS[n])) for n in names]
    return names[int(np.argmin(dist))]


def _template(shape: str, side: int) -> np.ndarray:
    canvas = Image.new("L", (side, side), 0)
    r = side / 2
    world.draw_shape(ImageDraw.Draw(canvas), shape, r, r, r, 255)
    return np.asarray(canvas) > 0


def classify(mask: np.ndarray) -> tuple[str, float]:
    """``(shape, IoU)``: the template shape that best overlaps a component's
    filled mask, drawn in the component's square bounding box."""
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    side = max(y1 - y0, x1 - x0)
    cy, cx = (y0 + y1) / 2, (x0 + x1) / 2
    top, left = int(round(cy - side / 2)), int(round(cx - side / 2))
    box = np.zeros((side, side), dtype=bool)
    ys_l, xs_l = ys - top, xs - left
    keep = (ys_l >= 0) & (ys_l < side) & (xs_l >= 0) & (xs_l < side)
    box[ys_l[keep], xs_l[keep]] = True
    best, best_iou = SHAPES[0], -1.0
    for shape in SHAPES:
        t = _template(shape, side)
        iou = float((t & box).sum() / max((t | box).sum(), 1))
        if iou > best_iou:
            best, best_iou = shape, iou
    return best, best_iou


def read_objects(image: Image.Image, fill_holes: bool = False) -> tuple[list[Detected], str]:
    """Objects and background read from an image, at the world's size: another
    size is first resized to 64x64 (box filter), transparency is composited on white.

    Args:
        fill_holes: fill each component's holes first (for outline drawings).
    Returns:
        ``(objects, background)``; an object's cell is the grid cell of its box centre.
    Raises:
        InvalidInputError: an empty image.
    """
    from scipy import ndimage

    from openbagel.images import to_rgb

    size = world.IMAGE_SIZE
    rgb = to_rgb(image)
    if rgb.size != (size, size):
        rgb = rgb.resize((size, size), Image.Resampling.BOX)
    img = np.asarray(rgb, dtype=np.float32)
    background = read_background(img)
    names, values = _palette(background)
    dist = np.linalg.norm(img[:, :, None, :] - values[None, None], axis=-1)
    label = dist.argmin(axis=-1)
    label[dist.min(axis=-1) > MAX_COLOR_DISTANCE] = -1
    small = 2 * world.half_extent("small", size)
    min_area = MIN_AREA_FRACTION * small * small
    threshold = (world.half_extent("small", size) + world.half_extent("large", size)) / 2
    found: list[Detected] = []
    for k, name in enumerate(names[:-1]):
        components, _ = ndimage.label(label == k)
        for j, box in enumerate(ndimage.find_objects(components), start=1):
            if box is None or (box[0].stop - box[0].start) * (box[1].stop - box[1].start) < min_area:
                continue
            mask = components[box] == j
            drawn = mask.sum()
            if fill_holes:
                mask = ndimage.binary_fill_holes(mask)
            if mask.sum() < min_area:
                continue
            ys, xs = np.nonzero(mask)
            cx = box[1].start + (xs.min() + xs.max() + 1) / 2
            cy = box[0].start + (ys.min() + ys.max() + 1) / 2
            half = max(xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()) / 2
            shape, iou = classify(mask)
            cell = (min(int(cy * 3 // size), 2), min(int(cx * 3 // size), 2))
            size_name = "small" if half < threshold else "large"
            found.append(Detected(Obj(shape, name, size_name, cell), cx, cy, iou, float(drawn / mask.sum())))
    return found, background


def read_scene(image: Image.Image, fill_holes: bool = False) -> Scene:
    """The scene an image shows, as far as the reader can tell (see :func:`read_objects`)."""
    found, background = read_objects(image, fill_holes)
    return Scene(tuple(d.obj for d in found), background)


def same_scene(a: Scene, b: Scene) -> bool:
    """Same background and the same objects (shape, colour, size, cell), in any order."""
    return a.background == b.background and sorted(map(repr, a.objects)) == sorted(map(repr, b.objects))


def _block_colors(img: Image.Image, n: int) -> np.ndarray:
    return np.asarray(img.convert("RGB").resize((n, n), Image.Resampling.BOX), dtype=np.float32)


def pixel_art_matches(output: Image.Image, target: Image.Image, background: str) -> bool:
    """Pixel art check: among blocks that are not background in the target or
    the output, at least 80% have the target's colour (within 60 RGB units)
    and are flat (per-channel spread under 25 inside the block)."""
    n = round(1 / world.PIXEL_BLOCK)
    out, tgt = _block_colors(output, n), _block_colors(target, n)
    bg = np.array(BACKGROUNDS[background], dtype=np.float32)
    busy = (np.linalg.norm(tgt - bg, axis=-1) > 60) | (np.linalg.norm(out - bg, axis=-1) > 60)
    if not busy.any():
        return True
    pixels = np.asarray(output.convert("RGB").resize(target.size), dtype=np.float32)
    side = pixels.shape[0] // n
    blocks = pixels[: n * side, : n * side].reshape(n, side, n, side, 3)
    flat = blocks.std(axis=(1, 3)).max(axis=-1) < 25
    agree = (np.linalg.norm(out - tgt, axis=-1) < 60) & flat
    return float(agree[busy].mean()) >= 0.8


def normalize_answer(text: str) -> str:
    t = " ".join(text.strip().lower().rstrip(".!").split())
    digits = {str(i): w for i, w in enumerate(world.NUMBERS)}
    return digits.get(t, t).replace("color", "colour")


# --- items ------------------------------------------------------------------------


@dataclass
class Item:
    """One eval item: its task, the inputs a model gets, and what is checked."""

    task: str
    prompt: str = ""
    images: list[Image.Image] = field(default_factory=list)
    answer: str | None = None
    request: world.Request | None = None
    target: Scene | None = None
    style: str | None = None
    target_image: Image.Image | None = None
    positions: list[tuple[str, str, float, float]] | None = None  # (colour, shape, x, y)
    group: str | None = None  # a sub-kind reported on its own (text to image: one, relation, count, many)


TASK_NAMES = ("t2i", "t2i_heldout", "qa", "edit", "style", "next_frame", "think")


def make_items(per_task: int = 20, seed: int = 1234, size: int = world.IMAGE_SIZE) -> list[Item]:
    """Fixed, seeded eval items (``per_task`` of each task), disjoint in seed
    from training data; held-out items use pairs/relations absent from training."""
    rng = random.Random(seed)
    items: list[Item] = []
    for task in ("t2i", "t2i_heldout"):
        for k in range(per_task):
            items.append(_t2i_item(rng, task, T2I_GROUPS[k % len(T2I_GROUPS)], size))
    for _ in range(per_task):
        scene = world.random_scene(rng, "train")
        q, a, _ = rng.choice(world.questions(scene, rng))
        items.append(Item("qa", q, [world.render(scene, size)], answer=a))
    for task, kinds in (("edit", ("recolor", "move", "remove", "add", "background")), ("style", ("style",))):
        for _ in range(per_task):
            e = world.random_edit(rng, world.random_scene(rng, "train"), "train", kinds)
            items.append(
                Item(
                    task,
                    e.instruction,
                    [world.render(e.before, size)],
                    target=e.after,
                    style=e.style,
                    target_image=world.render(e.after, size, e.style),
                )
            )
    for _ in range(per_task):
        clip = world.random_clip(rng, "train", size)
        last = clip.frames[-1]
        items.append(
            Item(
                "next_frame",
                "next frame",
                [clip.render(k, size) for k in range(len(clip.frames) - 1)],
                positions=[(m.color, m.shape, m.x, m.y) for m in last],
                target_image=clip.render(len(clip.frames) - 1, size),
            )
        )
    for _ in range(per_task):
        t = world.random_thought(rng, "train")
        items.append(Item("think", t.prompt, request=t.request, target_image=world.render(t.scene, size)))
    return items


#: Kinds of text-to-image items, reported separately: one object, two objects
#: in a relation, several identical objects (a count), several described objects.
T2I_GROUPS = ("one", "relation", "count", "many")
_GROUP_FORMS = {
    "one": ("full", "full+background", "short"),
    "relation": ("relation",),
    "count": ("count",),
    "many": ("full", "full+background"),
}


def _held_out(cap: world.Caption) -> bool:
    """Whether a caption asks for a held-out colour-shape pair or relation."""
    objs = cap.request.objects
    return any((s.color, s.shape) in world.HELD_OUT_PAIRS for s in objs) or any(
        (objs[i].shape, rel, objs[j].shape) in world.HELD_OUT_RELATIONS for i, rel, j in cap.request.relations
    )


def _t2i_item(rng: random.Random, task: str, group: str, size: int) -> Item:
    split = "train" if task == "t2i" else "test"
    for _ in range(10_000):
        if group == "one":
            scene = world.random_scene(rng, split, num_objects=1)
        elif group == "relation":
            scene = world.relation_scene(rng, split)
        elif group == "count":
            scene = world.counting_scene(rng, split)
        else:
            scene = world.random_scene(rng, split, num_objects=rng.choice((2, 3, 4)))
        caps = [c for c in world.captions(scene, split) if c.form in _GROUP_FORMS[group]]
        if task == "t2i_heldout":
            caps = [c for c in caps if _held_out(c)]
        if caps:
            cap = rng.choice(caps)
            return Item(task, cap.text, request=cap.request, target_image=world.render(scene, size), group=group)
    raise RuntimeError(f"no {task} item of group {group!r}")


def score_item(item: Item, output: Image.Image | str) -> bool:
    """Whether ``output`` (an image, or the answer text for ``qa``) is right for ``item``."""
    if item.task == "qa":
        return normalize_answer(str(output)) == normalize_answer(item.answer or "")
    if not isinstance(output, Image.Image):
        return False
    if item.task in ("t2i", "t2i_heldout", "think"):
        return item.request.satisfied_by(read_scene(output))
    if item.task in ("edit", "style"):
        if item.style == "pixel":
            return pixel_art_matches(output, item.target_image, item.target.background)
        if item.style == "invert":
            from PIL import ImageOps

            return same_scene(read_scene(ImageOps.invert(output.convert("RGB"))), item.target)
        if item.style == "outline":
            found, background = read_objects(output, fill_holes=True)
            outlined = all(d.solidity < 0.8 for d in found)
            return outlined and same_scene(Scene(tuple(d.obj for d in found), background), item.target)
        return same_scene(read_scene(output), item.target)
    if item.task == "next_frame":
        found, _ = read_objects(output)
        tol = POSITION_TOLERANCE
        if len(found) != len(item.positions):
            return False
        for color, shape, x, y in item.positions:
            if not any(
                d.obj.color == color and d.obj.shape == shape and abs(d.x - x) <= tol and abs(d.y - y) <= tol
                for d in found
            ):
                return False
        return True
    raise ValueError(f"unknown task {item.task!r}")


# --- predictors -------------------------------------------------------------------


class Predictor:
    """What ShapesEval asks of a model (one method per task)."""

    def text_to_image(self, item: Item) -> Image.Image: ...
    def answer(self, item: Item) -> str: ...
    def edit(self, item: Item) -> Image.Image: ...
    def next_frame(self, item: Item) -> Image.Image: ...
    def think(self, item: Item) -> Image.Image: ...


class GroundTruth(Predictor):
    """The world's own renderings and answers (scores ~1.0: a check of the checker)."""

    def text_to_image(self, item):
        return item.target_image

    def answer(self, item):
        return item.answer

    def edit(self, item):
        return item.target_image

    def next_frame(self, item):
        return item.target_image

    def think(self, item):
        return item.target_image


class ModelPredictor(Predictor):
    """A :class:`~openbagel.pipeline.BagelPipeline` answering the items (greedy
    text, seeded images; next frame: the frames as a chain of "next frame" turns).

    ``num_timesteps`` (None: the model's defaults) and ``step_cache`` apply to every image.
    """

    def __init__(self, pipe, seed: int = 0, num_timesteps: int | None = None, step_cache=None):
        self.pipe, self.seed = pipe, seed
        self.steps, self.step_cache = num_timesteps, step_cache

    def _image_kw(self) -> dict:
        return {"seed": self.seed, "num_timesteps": self.steps, "step_cache": self.step_cache}

    def text_to_image(self, item):
        return self.pipe.text_to_image(item.prompt, **self._image_kw()).image

    def answer(self, item):
        return self.pipe.understand(item.images[0], item.prompt).text

    def edit(self, item):
        return self.pipe.edit(item.images[0], item.prompt, **self._image_kw()).image

    def next_frame(self, item):
        chat = self.pipe.chat()
        for frame in item.images:
            w, h = chat.add_image(frame)
            chat.add_text("next frame")
        settings = self.pipe.image_settings(
            self.pipe.config.edit, height=h, width=w, seed=self.seed, num_timesteps=self.steps
        )
        return chat.generate_image(settings, step_cache=self.step_cache).image

    def think(self, item):
        return self.pipe.text_to_image(item.prompt, think=True, **self._image_kw()).image


def run_item(predictor: Predictor, item: Item) -> Image.Image | str:
    if item.task in ("t2i", "t2i_heldout"):
        return predictor.text_to_image(item)
    if item.task == "qa":
        return predictor.answer(item)
    if item.task in ("edit", "style"):
        return predictor.edit(item)
    if item.task == "next_frame":
        return predictor.next_frame(item)
    return predictor.think(item)


def evaluate(predictor: Predictor, items: list[Item], progress: Callable | None = None) -> dict[str, float]:
    """Per-task scores (fraction right), per group (``"t2i.one"``, ``"t2i.relation"``...),
    and ``overall`` (the mean of the task scores)."""
    right: dict[str, list[bool]] = {}
    groups: dict[str, list[bool]] = {}
    for item in items:
        ok = score_item(item, run_item(predictor, item))
        right.setdefault(item.task, []).append(ok)
        if item.group is not None:
            groups.setdefault(f"{item.task}.{item.group}", []).append(ok)
        if progress is not None:
            progress()
    scores = {task: sum(v) / len(v) for task, v in right.items()}
    overall = sum(scores.values()) / len(scores)
    scores.update({g: sum(v) / len(v) for g, v in sorted(groups.items())})
    scores["overall"] = overall
    return scores
