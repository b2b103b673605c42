"""The shapes world: a procedural world of flat-coloured shapes on plain
backgrounds, from which every task of the embedded model is derived
(text to image, questions, edits, style edits, next-frame clips, thinking).

Everything is deterministic from a seed. A scene holds 1-4 objects, one per
cell of a 3x3 grid; each object has a shape, a colour and a size. Some
colour-shape combinations and some relation phrasings never occur in the
``train`` split: they form the compositional ``test`` split.

Every caption, question and request comes with a machine-checkable
:class:`Request` (what an image must show), which the checker in
:mod:`openbagel.shapes.eval` verifies on any image.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

from PIL import Image, ImageDraw

#: Image side of the world's renderings, in pixels (the embedded model's size).
IMAGE_SIZE = 64

SHAPES = ("circle", "square", "triangle", "diamond")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (250, 140, 0),
    "yellow": (245, 215, 0),
    "green": (30, 160, 50),
    "blue": (30, 80, 230),
    "purple": (140, 50, 200),
    "pink": (250, 130, 200),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {"white": (255, 255, 255), "black": (0, 0, 0), "gray": (128, 128, 128)}
SIZES = ("small", "large")
#: Half-extent of an object as a fraction of the image side.
SIZE_FRACTION = {"small": 0.08, "large": 0.13}
STYLES = ("outline", "pixel", "invert")
#: Side of a "pixel art" block, as a fraction of the image side (4 px at 64).
PIXEL_BLOCK = 0.0625

ROWS = ("top", "middle", "bottom")
COLS = ("left", "center", "right")
NUMBERS = ("zero", "one", "two", "three", "four")

#: Colour-shape pairs that never appear in the train split.
HELD_OUT_PAIRS = frozenset({("purple", "triangle"), ("orange", "circle"), ("green", "diamond"), ("blue", "square")})
#: Relation captions ``(shape, relation, shape)`` that never appear in the train split.
HELD_OUT_RELATIONS = frozenset({("triangle", "above", "circle"), ("square", "left of", "diamond")})

#: The world's splits: ``train`` leaves out the held-out pairs and relations (a
#: model trained on it measures composition); ``test`` and ``all`` hold every
#: combination (``test`` names the held-out eval items, ``all`` the data of the
#: shipped model, which has no blind spots).
SPLITS = ("train", "test", "all")

Cell = tuple[int, int]  # (row, col), 0-based from the top left


def cell_name(cell: Cell) -> str:
    """``(0, 0)`` -> ``"top left"``, ``(1, 1)`` -> ``"center"``, ``(0, 1)`` -> ``"top"``."""
    r, c = cell
    if (r, c) == (1, 1):
        return "center"
    if r == 1:
        return COLS[c]
    if c == 1:
        return ROWS[r]
    return f"{ROWS[r]} {COLS[c]}"


def where(cell: Cell) -> str:
    """The cell with its preposition: "in the top left", "at the top", "on the left", "in the center"."""
    name = cell_name(cell)
    if name in ("top", "bottom"):
        return f"at the {name}"
    if name in ("left", "right"):
        return f"on the {name}"
    return f"in the {name}"


@dataclass(frozen=True)
class Obj:
    """One object: shape, colour name, size name and grid cell."""

    shape: str
    color: str
    size: str
    cell: Cell

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"

    def describe(self) -> str:
        return f"a {self.size} {self.color} {self.shape} {where(self.cell)}"


@dataclass(frozen=True)
class Scene:
    """Objects (at most one per cell) on a plain background."""

    objects: tuple[Obj, ...]
    background: str = "white"

    def at(self, cell: Cell) -> Obj | None:
        return next((o for o in self.objects if o.cell == cell), None)

    def free_cells(self) -> list[Cell]:
        used = {o.cell for o in self.objects}
        return [(r, c) for r in range(3) for c in range(3) if (r, c) not in used]

    def in_split(self, split: str) -> bool:
        """Whether the scene may appear in ``split`` (see :data:`SPLITS`; ``train`` excludes held-out pairs)."""
        return split != "train" or not any((o.color, o.shape) in HELD_OUT_PAIRS for o in self.objects)


@dataclass(frozen=True)
class Spec:
    """What one requested object must be; None = anything."""

    color: str | None = None
    shape: str | None = None
    size: str | None = None
    cell: Cell | None = None
    colors: frozenset[str] | None = None  # any of these colours
    shapes: frozenset[str] | None = None  # any of these shapes

    def matches(self, obj: Obj) -> bool:
        return (
            (self.color is None or obj.color == self.color)
            and (self.shape is None or obj.shape == self.shape)
            and (self.size is None or obj.size == self.size)
            and (self.cell is None or obj.cell == self.cell)
            and (self.colors is None or obj.color in self.colors)
            and (self.shapes is None or obj.shape in self.shapes)
        )


@dataclass(frozen=True)
class Request:
    """What an image must show: exactly ``len(objects)`` objects, each matching
    one spec (a one-to-one assignment), with the relations between assigned
    objects, the background (if given), and an optional extra predicate over
    all objects (``distinct_colors``, ``same_color``)."""

    objects: tuple[Spec, ...]
    relations: tuple[tuple[int, str, int], ...] = ()
    background: str | None = None
    rule: str | None = None

    def satisfied_by(self, scene: Scene) -> bool:
        """Whether ``scene`` (as read back from an image) fulfils the request."""
        from itertools import permutations

        if self.background is not None and scene.background != self.background:
            return False
        objs = scene.objects
        if len(objs) != len(self.objects):
            return False
        if self.rule == "distinct_colors" and len({o.color for o in objs}) != len(objs):
            return False
        if self.rule == "same_color" and len({o.color for o in objs}) > 1:
            return False
        for perm in permutations(objs):
            if all(s.matches(o) for s, o in zip(self.objects, perm)) and all(
                holds(perm[i], rel, perm[j]) for i, rel, j in self.relations
            ):
                return True
        return False


RELATIONS = ("left of", "right of", "above", "below")


def holds(a: Obj, rel: str, b: Obj) -> bool:
    """Grid relation between two objects (strict, by row or column)."""
    return {
        "left of": a.cell[1] < b.cell[1],
        "right of": a.cell[1] > b.cell[1],
        "above": a.cell[0] < b.cell[0],
        "below": a.cell[0] > b.cell[0],
    }[rel]


# --- rendering --------------------------------------------------------------------


def cell_center(cell: Cell, size: int = IMAGE_SIZE) -> tuple[float, float]:
    """Pixel centre ``(x, y)`` of a grid cell."""
    r, c = cell
    return (c + 0.5) * size / 3, (r + 0.5) * size / 3


def half_extent(size_name: str, size: int = IMAGE_SIZE) -> int:
    return round(SIZE_FRACTION[size_name] * size)


def shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    """Corner points of a polygonal shape (None for a circle)."""
    if shape == "square":
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "triangle":  # pointing up
        return [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    if shape == "circle":
        return None
    raise ValueError(f"unknown shape {shape!r}")


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill, outline=None, width=1):
    """Draw one shape centred at ``(cx, cy)`` with half-extent ``r`` (pixels)."""
    box = (cx - r, cy - r, cx + r - 1, cy + r - 1)
    poly = shape_polygon(shape, cx - 0.5, cy - 0.5, r - 0.5)
    if poly is None:
        draw.ellipse(box, fill=fill, outline=outline, width=width)
    else:
        if outline is not None and fill is None:
            draw.line(poly + poly[:1], fill=outline, width=width, joint="curve")
        else:
            draw.polygon(poly, fill=fill)


def render(scene: Scene, size: int = IMAGE_SIZE, style: str | None = None) -> Image.Image:
    """The scene as an RGB image ``size`` x ``size``, optionally in a style
    (``outline``: shapes as 2-pixel outlines; ``pixel``: 4x4-pixel blocks at
    64 px; ``invert``: every colour inverted)."""
    if size < 16:
        raise ValueError(f"size must be at least 16 pixels, got {size}")
    img = Image.new("RGB", (size, size), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        cx, cy = cell_center(o.cell, size)
        r = half_extent(o.size, size)
        if style == "outline":
            draw_shape(draw, o.shape, cx, cy, r, None, outline=COLORS[o.color], width=max(2, size // 32))
        else:
            draw_shape(draw, o.shape, cx, cy, r, COLORS[o.color])
    return stylize(img, style)


def stylize(img: Image.Image, style: str | None) -> Image.Image:
    """Apply a whole-image style (``pixel`` or ``invert``; ``outline`` is drawn by :func:`render`)."""
    if style == "pixel":
        n = round(1 / PIXEL_BLOCK)
        return img.resize((n, n), Image.Resampling.NEAREST).resize(img.size, Image.Resampling.NEAREST)
    if style == "invert":
        from PIL import ImageOps

        return ImageOps.invert(img)
    if style not in (None, "outline"):
        raise ValueError(f"unknown style {style!r}; choose from {', '.join(STYLES)}")
    return img


# --- scenes -----------------------------------------------------------------------


def random_object(rng: random.Random, cell: Cell, split: str = "train") -> Obj:
    while True:
        obj = Obj(rng.choice(SHAPES), rng.choice(list(COLORS)), rng.choice(SIZES), cell)
        if split != "train" or (obj.color, obj.shape) not in HELD_OUT_PAIRS:
            return obj


def random_scene(rng: random.Random, split: str = "train", num_objects: int | None = None) -> Scene:
    """A random scene of 1-4 objects in distinct cells, valid for ``split``."""
    n = num_objects or rng.choice((1, 1, 2, 2, 3, 4))
    cells = rng.sample([(r, c) for r in range(3) for c in range(3)], n)
    objects = tuple(random_object(rng, cell, split) for cell in cells)
    return Scene(objects, rng.choice(list(BACKGROUNDS)))


def held_out_scene(rng: random.Random) -> Scene:
    """A test scene with at least one held-out colour-shape pair."""
    scene = random_scene(rng, "test")
    color, shape = rng.choice(sorted(HELD_OUT_PAIRS))
    first = replace(scene.objects[0], color=color, shape=shape)
    return replace(scene, objects=(first, *scene.objects[1:]))


# --- captions ---------------------------------------------------------------------


def article(word: str) -> str:
    """``"an"`` before a vowel sound ("an orange"), else ``"a"``."""
    return "an" if word[:1] in "aeiou" else "a"


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _plural(shape: str) -> str:
    return shape + "s"


@dataclass(frozen=True)
class Caption:
    """A caption and the request it makes."""

    text: str
    request: Request
    form: str


def captions(scene: Scene, split: str = "train") -> list[Caption]:
    """Every caption form that applies to ``scene``: a full description (with and
    without the background), a relation between two objects, a count of
    identical objects, and a short form for single objects."""
    objs = scene.objects
    full = Request(tuple(Spec(o.color, o.shape, o.size, o.cell) for o in objs))
    out = [
        Caption(_join([o.describe() for o in objs]), full, "full"),
        Caption(
            f"{_join([o.describe() for o in objs])} on a {scene.background} background",
            replace(full, background=scene.background),
            "full+background",
        ),
    ]
    if len(objs) == 1:
        o = objs[0]
        out.append(Caption(f"a {o.size} {o.color} {o.shape}", Request((Spec(o.color, o.shape, o.size),)), "short"))
    if len(objs) == 2:
        a, b = objs
        for rel in RELATIONS:
            if holds(a, rel, b) and (split != "train" or (a.shape, rel, b.shape) not in HELD_OUT_RELATIONS):
                req = Request((Spec(a.color, a.shape), Spec(b.color, b.shape)), ((0, rel, 1),))
                out.append(
                    Caption(
                        f"{article(a.color)} {a.color} {a.shape} {rel} {article(b.color)} {b.color} {b.shape}",
                        req,
                        "relation",
                    )
                )
    if len(objs) >= 2 and len({(o.color, o.shape) for o in objs}) == 1:
        o = objs[0]
        req = Request(tuple(Spec(o.color, o.shape) for _ in objs))
        out.append(Caption(f"{NUMBERS[len(objs)]} {o.color} {_plural(o.shape)}", req, "count"))
    return out


#: The background of a picture whose caption names none, when captions follow the defaults.
DEFAULT_BACKGROUND = "gray"
#: Where a relation puts its two objects under the defaults: ``rel -> (cell of a, cell of b)``.
RELATION_CELLS: dict[str, tuple[Cell, Cell]] = {
    "left of": ((1, 0), (1, 2)),
    "right of": ((1, 2), (1, 0)),
    "above": ((0, 1), (2, 1)),
    "below": ((2, 1), (0, 1)),
}
#: Where a count of 2, 3 or 4 identical objects goes under the defaults.
COUNT_CELLS: dict[int, tuple[Cell, ...]] = {
    2: ((1, 0), (1, 2)),
    3: ((1, 0), (1, 1), (1, 2)),
    4: ((0, 0), (0, 2), (2, 0), (2, 2)),
}


def default_scene(scene: Scene, caption: Caption) -> Scene:
    """The one picture of ``caption`` when what it leaves out takes the world's
    defaults: a gray background unless named; a single object without a
    position in the centre; a relation's two objects on opposite sides of the
    centre along its axis (:data:`RELATION_CELLS`); a count's objects in a fixed
    pattern (:data:`COUNT_CELLS`); large objects where the size is not named.

    ``caption`` must be one of ``captions(scene)``. The result still fulfils
    ``caption.request``. Training on such pictures makes the caption decide
    the picture, so a small model need not average over the layouts a caption
    allows (which draws nothing where every layout differs).
    """
    background = scene.background if caption.request.background else DEFAULT_BACKGROUND
    objs = scene.objects
    if caption.form == "short":
        objs = (replace(objs[0], cell=(1, 1)),)
    elif caption.form == "relation":
        ((i, rel, j),) = caption.request.relations
        cells = RELATION_CELLS[rel]
        objs = (replace(objs[i], cell=cells[0], size="large"), replace(objs[j], cell=cells[1], size="large"))
    elif caption.form == "count":
        objs = tuple(replace(o, cell=c, size="large") for o, c in zip(objs, COUNT_CELLS[len(objs)]))
    return Scene(objs, background)


def counting_scene(rng: random.Random, split: str = "train") -> Scene:
    """A scene of 2-4 identical objects (for count captions)."""
    n = rng.choice((2, 3, 4))
    proto = random_object(rng, (0, 0), split)
    cells = rng.sample([(r, c) for r in range(3) for c in range(3)], n)
    return Scene(tuple(replace(proto, cell=c, size=rng.choice(SIZES)) for c in cells), rng.choice(list(BACKGROUNDS)))


def relation_scene(rng: random.Random, split: str = "train") -> Scene:
    return random_scene(rng, split, num_objects=2)


# --- questions --------------------------------------------------------------------


def _unique(scene: Scene, key: Callable[[Obj], object]) -> list[Obj]:
    values = [key(o) for o in scene.objects]
    return [o for o, v in zip(scene.objects, values) if values.count(v) == 1]


def questions(scene: Scene, rng: random.Random, split: str = "train") -> list[tuple[str, str, str]]:
    """``(question, answer, kind)`` about the scene; kinds: colour, shape,
    count, position, existence, relation, background. Answers are single
    words or cell names ("top left"), "yes"/"no", number words. In the train
    split no question names a held-out pair or relation."""
    qa: list[tuple[str, str, str]] = []
    for o in _unique(scene, lambda o: o.shape):
        qa.append((f"What colour is the {o.shape}?", o.color, "colour"))
    for o in _unique(scene, lambda o: o.color):
        qa.append((f"What shape is the {o.color} object?", o.shape, "shape"))
    shape = rng.choice(SHAPES)
    qa.append((f"How many {_plural(shape)} are there?", NUMBERS[sum(o.shape == shape for o in scene.objects)], "count"))
    qa.append(("How many objects are there?", NUMBERS[len(scene.objects)], "count"))
    unique = _unique(scene, lambda o: o.name)
    for o in unique:
        qa.append((f"Where is the {o.name}?", cell_name(o.cell), "position"))
    color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
    if split != "train" or (color, shape) not in HELD_OUT_PAIRS:
        present = any(o.color == color and o.shape == shape for o in scene.objects)
        qa.append((f"Is there {article(color)} {color} {shape}?", "yes" if present else "no", "existence"))
    if len(unique) >= 2:
        a, b = rng.sample(unique, 2)
        rel = rng.choice(RELATIONS)
        if split != "train" or (a.shape, rel, b.shape) not in HELD_OUT_RELATIONS:
            qa.append((f"Is the {a.name} {rel} the {b.name}?", "yes" if holds(a, rel, b) else "no", "relation"))
    qa.append(("What colour is the background?", scene.background, "background"))
    return qa


# --- edits ------------------------------------------------------------------------


@dataclass(frozen=True)
class Edit:
    """An instruction turning ``before`` into ``after`` (a scene, drawn in ``style``)."""

    instruction: str
    before: Scene
    after: Scene
    kind: str
    style: str | None = None


def _swap(scene: Scene, old: Obj, new: Obj | None) -> Scene:
    objs = tuple(o for o in scene.objects if o != old) + ((new,) if new is not None else ())
    return replace(scene, objects=objs)


def random_edit(rng: random.Random, scene: Scene, split: str = "train", kinds: tuple[str, ...] | None = None) -> Edit:
    """A random applicable edit of ``scene`` (recolour, move, remove, add,
    background, or a style); the result stays valid for ``split``."""
    kinds = kinds or ("recolor", "move", "remove", "add", "background", "style")
    for _ in range(100):
        kind = rng.choice(kinds)
        unique = _unique(scene, lambda o: o.name)
        if kind == "recolor" and unique:
            o = rng.choice(unique)
            new = rng.choice([c for c in COLORS if c != o.color])
            verb = rng.choice(("make the {} {}", "change the {} to {}", "paint the {} {}"))
            after = _swap(scene, o, replace(o, color=new))
            edit = Edit(verb.format(o.name, new), scene, after, kind)
        elif kind == "move" and unique and scene.free_cells():
            o = rng.choice(unique)
            cell = rng.choice(scene.free_cells())
            after = _swap(scene, o, replace(o, cell=cell))
            edit = Edit(f"move the {o.name} to the {cell_name(cell)}", scene, after, kind)
        elif kind == "remove" and unique and len(scene.objects) > 1:
            o = rng.choice(unique)
            edit = Edit(f"{rng.choice(('remove', 'delete'))} the {o.name}", scene, _swap(scene, o, None), kind)
        elif kind == "add" and len(scene.objects) < 4:
            new = random_object(rng, rng.choice(scene.free_cells()), split)
            edit = Edit(f"add {new.describe()}", scene, replace(scene, objects=(*scene.objects, new)), kind)
        elif kind == "background":
            bg = rng.choice([b for b in BACKGROUNDS if b != scene.background])
            verb = rng.choice(("change the background to {}", "make the background {}"))
            edit = Edit(verb.format(bg), scene, replace(scene, background=bg), kind)
        elif kind == "style":
            style = rng.choice(STYLES)
            text = {
                "outline": rng.choice(("draw only the outlines", "outline style")),
                "pixel": rng.choice(("make it pixel art", "pixel art style")),
                "invert": rng.choice(("invert the colours", "invert the colors")),
            }[style]
            edit = Edit(text, scene, scene, kind, style)
        else:
            continue
        if edit.after.in_split(split):
            return edit
    raise ValueError("no applicable edit for this scene")


# --- clips ------------------------------------------------------------------------


@dataclass(frozen=True)
class Mover:
    """An object moving at constant velocity (pixels per frame), bouncing off the walls."""

    shape: str
    color: str
    size: str
    x: float
    y: float
    vx: float
    vy: float


@dataclass(frozen=True)
class Clip:
    frames: tuple[tuple[Mover, ...], ...]
    background: str

    def render(self, k: int, size: int = IMAGE_SIZE) -> Image.Image:
        img = Image.new("RGB", (size, size), BACKGROUNDS[self.background])
        draw = ImageDraw.Draw(img)
        for m in self.frames[k]:
            draw_shape(draw, m.shape, m.x, m.y, half_extent(m.size, size), COLORS[m.color])
        return img


def step_mover(m: Mover, size: int = IMAGE_SIZE) -> Mover:
    """One frame of motion; a wall reflects the velocity (and the overshoot)."""
    r = half_extent(m.size, size)
    x, y, vx, vy = m.x + m.vx, m.y + m.vy, m.vx, m.vy
    if x - r < 0 or x + r > size:
        vx = -vx
        x = 2 * (r if x - r < 0 else size - r) - x
    if y - r < 0 or y + r > size:
        vy = -vy
        y = 2 * (r if y - r < 0 else size - r) - y
    return replace(m, x=x, y=y, vx=vx, vy=vy)


def random_clip(rng: random.Random, split: str = "train", size: int = IMAGE_SIZE) -> Clip:
    """4-6 frames of 1-2 objects of distinct colours moving without overlapping."""
    while True:
        movers = []
        for _ in range(rng.choice((1, 2))):
            obj = random_object(rng, (0, 0), split)
            r = half_extent(obj.size, size)
            speed = size / 16  # 4 px per frame at 64 px
            movers.append(
                Mover(
                    obj.shape,
                    obj.color,
                    obj.size,
                    rng.uniform(r, size - r),
                    rng.uniform(r, size - r),
                    rng.choice((-1, 1)) * rng.uniform(0.5, 1.0) * speed,
                    rng.choice((-1, 1)) * rng.uniform(0.5, 1.0) * speed,
                )
            )
        frames = [tuple(movers)]
        for _ in range(rng.choice((4, 5, 6)) - 1):
            frames.append(tuple(step_mover(m, size) for m in frames[-1]))
        colours_ok = len({m.color for m in movers}) == len(movers)
        if colours_ok and not any(_overlap(f, size) for f in frames):
            return Clip(tuple(frames), rng.choice(list(BACKGROUNDS)))


def _overlap(movers: tuple[Mover, ...], size: int) -> bool:
    for i, a in enumerate(movers):
        for b in movers[i + 1 :]:
            gap = half_extent(a.size, size) + half_extent(b.size, size) + 2
            if abs(a.x - b.x) < gap and abs(a.y - b.y) < gap:
                return True
    return False


# --- thinking ---------------------------------------------------------------------

WARM = frozenset({"red", "orange", "yellow", "pink"})
COOL = frozenset({"green", "blue", "purple"})
LIKE = {"grass": "green", "the sky": "blue", "a banana": "yellow", "a strawberry": "red", "a lavender flower": "purple"}
CORNERS = {
    "three corners": frozenset({"triangle"}),
    "no corners": frozenset({"circle"}),
    "four corners": frozenset({"square", "diamond"}),
}


@dataclass(frozen=True)
class Thought:
    """An under-specified request, a concrete scene that fulfils it, and the plan naming that scene."""

    prompt: str
    request: Request
    scene: Scene

    @property
    def plan(self) -> str:
        return f"The request asks for {self.prompt}. I will draw {_join([o.describe() for o in self.scene.objects])}."


def random_thought(rng: random.Random, split: str = "train") -> Thought:
    """An under-specified image request and one concrete scene that satisfies it."""
    bg = rng.choice(list(BACKGROUNDS))
    cells = [(r, c) for r in range(3) for c in range(3)]
    for _ in range(100):
        kind = rng.choice(("distinct", "same", "corners", "warmcool", "like", "corner_cells"))
        if kind == "distinct":
            n = rng.choice((2, 3))
            shape = rng.choice(SHAPES)
            colors = rng.sample(list(COLORS), n)
            objs = [Obj(shape, c, rng.choice(SIZES), cell) for c, cell in zip(colors, rng.sample(cells, n))]
            prompt = f"{NUMBERS[n]} {_plural(shape)}, all different colours"
            req = Request(tuple(Spec(shape=shape) for _ in range(n)), rule="distinct_colors")
        elif kind == "same":
            n = rng.choice((2, 3))
            shape, color = rng.choice(SHAPES), rng.choice(list(COLORS))
            objs = [Obj(shape, color, rng.choice(SIZES), cell) for cell in rng.sample(cells, n)]
            prompt = f"{NUMBERS[n]} {_plural(shape)} of the same colour"
            req = Request(tuple(Spec(shape=shape) for _ in range(n)), rule="same_color")
        elif kind == "corners":
            phrase = rng.choice(sorted(CORNERS))
            shape = rng.choice(sorted(CORNERS[phrase]))
            color = rng.choice(list(COLORS))
            objs = [Obj(shape, color, "large", (1, 1))]
            prompt = f"{article(color)} {color} shape with {phrase}"
            req = Request((Spec(color=color, shapes=CORNERS[phrase]),))
        elif kind == "warmcool":
            warm = rng.random() < 0.5
            pool = WARM if warm else COOL
            shape = rng.choice(SHAPES)
            objs = [Obj(shape, rng.choice(sorted(pool)), rng.choice(SIZES), rng.choice(cells))]
            prompt = f"a {shape} in a {'warm' if warm else 'cool'} colour"
            req = Request((Spec(shape=shape, colors=pool),))
        elif kind == "like":
            thing = rng.choice(sorted(LIKE))
            shape = rng.choice(SHAPES)
            objs = [Obj(shape, LIKE[thing], rng.choice(SIZES), rng.choice(cells))]
            prompt = f"a {shape} the colour of {thing}"
            req = Request((Spec(color=LIKE[thing], shape=shape),))
        else:  # corner_cells
            corners = [(0, 0), (0, 2), (2, 0), (2, 2)]
            shape = rng.choice(SHAPES)
            objs = [Obj(shape, rng.choice(list(COLORS)), "small", c) for c in corners]
            prompt = f"a {shape} in every corner"
            req = Request(tuple(Spec(shape=shape, cell=c) for c in corners))
        scene = Scene(tuple(objs), bg)
        if scene.in_split(split):
            return Thought(prompt, req, scene)
    raise RuntimeError("could not draw a thinking request")


# --- training records -------------------------------------------------------------

TASKS = ("t2i", "qa", "edit", "style", "clip", "think")


@dataclass
class WorldSource:
    """Endless-per-pass training records of the world, for the trainer's
    in-memory input (:class:`openbagel.train.data.RecordSource`): ``count``
    records per pass, drawn from ``tasks`` with ``weights``, deterministic from ``seed``.
    ``unspecified``: ``"random"`` (what a caption leaves out is drawn at random)
    or ``"default"`` (it takes the world's defaults, see :func:`default_scene`).

    Records: ``{"kind": "t2i", "caption": [...] or str, "image"}``, ``{"kind": "chat",
    "images", "turns"}``, ``{"kind": "edit", "images", "instructions"}``,
    ``{"kind": "think", "prompt", "plan", "image"}``.
    """

    count: int = 1000
    seed: int = 0
    split: str = "train"
    tasks: tuple[str, ...] = TASKS
    weights: tuple[float, ...] | None = None
    size: int = IMAGE_SIZE
    unspecified: str = "random"

    def __post_init__(self) -> None:
        import math

        if isinstance(self.tasks, str) or not self.tasks or not all(isinstance(t, str) for t in self.tasks):
            raise ValueError(f"tasks must be a non-empty list of task names ({', '.join(TASKS)}), got {self.tasks!r}")
        self.tasks = tuple(self.tasks)
        unknown = set(self.tasks) - set(TASKS)
        if unknown:
            raise ValueError(f"unknown shapes task(s) {sorted(unknown)}; choose from {', '.join(TASKS)}")
        if self.weights is not None:
            w = self.weights
            numbers = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in w)
            if (
                not numbers
                or len(w) != len(self.tasks)
                or not all(0 <= x < math.inf for x in w)
                or not 0 < sum(w) < math.inf
            ):
                raise ValueError(
                    f"weights must give one finite number >= 0 per task ({len(self.tasks)}), not all 0; got {list(w)!r}"
                )
        for name in ("count", "seed", "size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        if self.count < 1 or self.seed < 0 or self.size < 16:
            raise ValueError("count must be >= 1, seed >= 0 and size >= 16")
        if self.split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {self.split!r}")
        _check_unspecified(self.unspecified)

    def __call__(self) -> Iterator[dict]:
        rng = random.Random(self.seed)
        for _ in range(self.count):
            task = rng.choices(self.tasks, self.weights)[0]
            yield make_record(task, rng, self.split, self.size, self.unspecified)


def _check_unspecified(value: object) -> None:
    if value not in ("random", "default"):
        raise ValueError(f"unspecified must be 'random' or 'default', got {value!r}")


def make_record(
    task: str, rng: random.Random, split: str = "train", size: int = IMAGE_SIZE, unspecified: str = "random"
) -> dict:
    """One training record of ``task`` (see :class:`WorldSource`).

    ``unspecified="default"``: a text-to-image record has one caption and the
    picture :func:`default_scene` makes of it; a thinking record's picture has
    the default background (its plan names none). ``"random"``: every caption
    of a random scene (the reader picks one) and the scene as drawn.
    """
    _check_unspecified(unspecified)
    if task == "t2i":
        scene = rng.choice((random_scene, random_scene, counting_scene, relation_scene))(rng, split)
        caps = captions(scene, split)
        if unspecified == "default":
            cap = rng.choice(caps)
            return {"kind": "t2i", "caption": cap.text, "image": render(default_scene(scene, cap), size)}
        return {"kind": "t2i", "caption": [c.text for c in caps], "image": render(scene, size)}
    if task == "qa":
        scene = random_scene(rng, split)
        pool = questions(scene, rng, split)
        qa = rng.sample(pool, k=min(3, len(pool)))
        turns = []
        for k, (q, a, _) in enumerate(qa):
            turns += [("human", ("<image>\n" if k == 0 else "") + q), ("gpt", a)]
        return {"kind": "chat", "images": [render(scene, size)], "turns": turns}
    if task in ("edit", "style"):
        scene = random_scene(rng, split)
        kinds = ("style",) if task == "style" else ("recolor", "move", "remove", "add", "background")
        e = random_edit(rng, scene, split, kinds)
        return {
            "kind": "edit",
            "images": [render(e.before, size), render(e.after, size, e.style)],
            "instructions": [e.instruction],
        }
    if task == "clip":
        clip = random_clip(rng, split, size)
        n = len(clip.frames)
        return {
            "kind": "edit",
            "images": [clip.render(k, size) for k in range(n)],
            "instructions": ["next frame"] * (n - 1),
        }
    if task == "think":
        t = random_thought(rng, split)
        scene = replace(t.scene, background=DEFAULT_BACKGROUND) if unspecified == "default" else t.scene
        return {"kind": "think", "prompt": t.prompt, "plan": t.plan, "image": render(scene, size)}
    raise ValueError(f"unknown shapes task {task!r}")


def world_text(count: int = 2000, seed: int = 0) -> Iterator[str]:
    """Every kind of text the world produces (captions, questions, answers,
    instructions, plans), both splits, for training a tokenizer."""
    rng = random.Random(seed)
    for i in range(count):
        split = "train" if i % 2 else "test"
        scene = random_scene(rng, split)
        for c in captions(scene, split):
            yield c.text
        for c in captions(counting_scene(rng, split), split) + captions(relation_scene(rng, split), split):
            yield c.text
        for q, a, _ in questions(scene, rng, split):
            yield q
            yield a
        yield random_edit(rng, scene, split).instruction
        t = random_thought(rng, split)
        yield t.prompt
        yield t.plan
    yield "next frame"
