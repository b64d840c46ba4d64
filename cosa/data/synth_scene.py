"""Render one synthetic scene: background context, clutter, textured objects, mask.

Rendering parameters (module constants, sizes relative to the image's shorter side S):

- OBJECT_RADIUS = (0.18, 0.38): object radius ~ U(0.18 S, 0.38 S); OBJECT_ASPECT: aspect
  ~ U(0.8, 1.25) (area kept); rotation ~ U(0, 2 pi).
- PAIR_GAP = (0.55, 0.95): an object planned "near" another is centred at (r1 + r2) * U(0.55, 0.95)
  from it in a random direction, so co-occurring classes touch and overlap.
- MIN_VISIBLE = 0.4: a new object may hide at most 60 % of any earlier object (later objects occlude
  earlier ones); MIN_IN_FRAME = 0.7: at least 70 % of an object lies inside the image.
  PLACEMENT_TRIES = 25 attempts per object, then it is left out (its class label follows the mask).
- CLUTTER = (6, 16) random lines, small ellipses and rectangle outlines in any colour behind the
  objects; TEXTURED_DISTRACTORS = (0, 1) near-square rectangles (radius DISTRACTOR_SCALE = 0.7 times
  an object's) painted with a random class's texture and colour band (so texture + colour without
  shape is not enough); OCCLUDERS = (0, 2) thin lines drawn over the objects (background in the
  mask).
- Lighting: a linear gain ramp 1 + U(-0.3, 0.3) across each axis, then Gaussian noise sigma 0.02.
- Colours: a class's main colour comes from its HSV band (`ClassSpec`), the pattern's second colour
  from the same hue band at VALUE_DARK = (0.35, 0.6) times the value range; a directional shading
  ramp of +-20 % crosses each object. Texture frequencies and the background contexts' own
  parameters are in `cosa.data.synth_textures`.
- EDGE_SIGMA = 0.7 px: objects are alpha-blended through a Gaussian-blurred mask (soft edges).
- BOUNDARY_KERNEL = 3: mask pixels whose 3x3 neighbourhood holds two different ids become 255, a
  band 2 px wide along every class boundary (like VOC's void band); the image border is not a
  boundary.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from cosa.data.classes import IGNORE_INDEX
from cosa.data.synth_shapes import shape_mask
from cosa.data.synth_textures import context_background, hsv_colour, object_texture

OBJECT_RADIUS = (0.18, 0.38)
OBJECT_ASPECT = (0.8, 1.25)
PAIR_GAP = (0.55, 0.95)
MIN_VISIBLE = 0.4
MIN_IN_FRAME = 0.7
PLACEMENT_TRIES = 25
CLUTTER = (6, 16)
TEXTURED_DISTRACTORS = (0, 1)
DISTRACTOR_SCALE = 0.7
OCCLUDERS = (0, 2)
LIGHT_GAIN = 0.3
NOISE_SIGMA = 0.02
EDGE_SIGMA = 0.7
BOUNDARY_KERNEL = 3


@dataclass(frozen=True)
class ClassSpec:
    """What makes a class recognisable: a shape family, a texture family and a colour band.

    Attributes:
        name: class name (mask id = position in the class list + 1).
        shape: key of `cosa.data.synth_shapes.SHAPES`.
        texture: one of `cosa.data.synth_textures.TEXTURES`.
        hue: colour band centre in turns; hue_jitter its half width.
        saturation, value: (low, high) ranges of the main colour; the pattern's second colour has
            the same hue band at a lower value (VALUE_DARK times the main range).
    """

    name: str
    shape: str
    texture: str
    hue: float
    hue_jitter: float = 0.04
    saturation: tuple[float, float] = (0.45, 0.9)
    value: tuple[float, float] = (0.55, 0.95)


VALUE_DARK = (0.35, 0.6)


@dataclass(frozen=True)
class ObjectPlan:
    """One object to draw: its mask id and, for a co-occurring pair, the earlier object it
    touches (index into the scene's objects)."""

    class_id: int
    near: int | None = None


@dataclass(frozen=True)
class ScenePlan:
    """Everything decided before drawing: size, context and objects in drawing order."""

    height: int
    width: int
    context: str
    objects: tuple[ObjectPlan, ...]


@dataclass
class _Placed:
    """A placed object: its box in the image, its mask there, its frame coordinates."""

    rows: slice
    cols: slice
    mask: np.ndarray  # bool (h, w), the in-frame part of the shape
    u: np.ndarray  # float32 (h, w) object-frame coordinates
    v: np.ndarray
    centre: tuple[float, float]  # (y, x) in pixels
    radius: float
    area: int  # in-frame pixels of the shape
    visible: int  # of those, pixels not hidden by later objects (kept up to date while placing)


def render_scene(
    plan: ScenePlan, classes: Sequence[ClassSpec], rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Draw a planned scene.

    Args:
        plan: size, context and objects (class ids 1..len(classes)).
        classes: the class specs, id i is classes[i - 1].
        rng: the image's own generator (all randomness of the drawing comes from it).

    Returns:
        (image uint8 (H, W, 3) RGB, mask uint8 (H, W): 0 background, 1..C classes, 255 boundary).
    """
    height, width = plan.height, plan.width
    image = context_background(plan.context, height, width, rng)
    _draw_clutter(image, rng)
    for _ in range(int(rng.integers(TEXTURED_DISTRACTORS[0], TEXTURED_DISTRACTORS[1] + 1))):
        spec = classes[int(rng.integers(len(classes)))]
        placed = _try_place(rng, height, width, "rectangle", None, [], None, DISTRACTOR_SCALE)
        if placed is not None:
            _paint(image, placed, spec, rng)

    owner = np.full((height, width), -1, dtype=np.int16)  # index of the visible object per pixel
    placed_objects: list[_Placed] = []
    owner_class: list[int] = []
    by_plan: dict[int, _Placed] = {}  # plan position -> placed object (placement can fail)
    for position, obj in enumerate(plan.objects):
        spec = classes[obj.class_id - 1]
        near = by_plan.get(obj.near) if obj.near is not None else None
        placed = _try_place(rng, height, width, spec.shape, near, placed_objects, owner)
        if placed is None:
            continue
        _paint(image, placed, spec, rng)
        owner[placed.rows, placed.cols][placed.mask] = len(placed_objects)
        placed_objects.append(placed)
        owner_class.append(obj.class_id)
        by_plan[position] = placed

    _draw_occluders(image, owner, rng)
    lookup = np.asarray([0, *owner_class], dtype=np.uint8)
    mask = lookup[owner.astype(np.int64) + 1]
    return _finish(image, rng), _boundary_band(mask)


def _frame(
    centre: tuple[float, float], radius: float, angle: float, aspect: float
) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Object-frame coordinates over the object's whole (unclipped) box.

    Returns:
        (u, v, top, left): float32 (h, w) coordinates, and the box's top-left pixel (may be < 0).
    """
    cy, cx = centre
    reach = radius * max(aspect, 1.0 / aspect) * 1.05
    top, left = int(np.floor(cy - reach)), int(np.floor(cx - reach))
    size_y, size_x = int(np.ceil(cy + reach)) + 1 - top, int(np.ceil(cx + reach)) + 1 - left
    yy, xx = np.mgrid[top : top + size_y, left : left + size_x].astype(np.float32)
    dy, dx = (yy + 0.5 - cy) / radius, (xx + 0.5 - cx) / radius
    cos, sin = np.float32(np.cos(angle)), np.float32(np.sin(angle))
    u = (dx * cos + dy * sin) / np.float32(np.sqrt(aspect))
    v = (-dx * sin + dy * cos) * np.float32(np.sqrt(aspect))
    return u, v, top, left


def _try_place(
    rng: np.random.Generator,
    height: int,
    width: int,
    shape: str,
    near: _Placed | None,
    earlier: list[_Placed],
    owner: np.ndarray | None,
    scale: float = 1.0,
) -> _Placed | None:
    """Find a position, scale and rotation meeting the visibility rules; None after the tries.

    When `owner` is given, a successful placement also lowers the `visible` count of the earlier
    objects it covers.
    """
    side = min(height, width)
    for _ in range(PLACEMENT_TRIES):
        radius = rng.uniform(*OBJECT_RADIUS) * side * scale
        aspect = rng.uniform(*OBJECT_ASPECT)
        angle = rng.uniform(0, 2 * np.pi)
        if near is None:
            centre = (rng.uniform(0.12, 0.88) * height, rng.uniform(0.12, 0.88) * width)
        else:
            direction = rng.uniform(0, 2 * np.pi)
            gap = (near.radius + radius) * rng.uniform(*PAIR_GAP)
            centre = (
                near.centre[0] + gap * np.sin(direction),
                near.centre[1] + gap * np.cos(direction),
            )
        u, v, top, left = _frame(centre, radius, angle, aspect)
        full = shape_mask(shape, u, v, rng)
        y0, x0 = max(top, 0), max(left, 0)
        y1, x1 = min(top + u.shape[0], height), min(left + u.shape[1], width)
        if y1 <= y0 or x1 <= x0:
            continue
        crop = (slice(y0 - top, y1 - top), slice(x0 - left, x1 - left))
        mask = full[crop]
        area = int(mask.sum())
        if area == 0 or area < MIN_IN_FRAME * int(full.sum()):
            continue
        rows, cols = slice(y0, y1), slice(x0, x1)
        if owner is not None and not _cover(owner[rows, cols][mask], earlier):
            continue
        return _Placed(rows, cols, mask, u[crop], v[crop], centre, radius, area, area)
    return None


def _cover(covered: np.ndarray, earlier: list[_Placed]) -> bool:
    """Accept a new object over pixels owned by `covered` (ids of earlier objects, -1 = none)?

    Accepted when every earlier object keeps at least MIN_VISIBLE of its area; then their
    `visible` counts are lowered by what the new object hides.
    """
    if not earlier:
        return True
    hidden = np.bincount(covered[covered >= 0].astype(np.int64), minlength=len(earlier))
    if any(p.visible - int(h) < MIN_VISIBLE * p.area for p, h in zip(earlier, hidden, strict=True)):
        return False
    for p, h in zip(earlier, hidden, strict=True):
        p.visible -= int(h)
    return True


def _paint(image: np.ndarray, placed: _Placed, spec: ClassSpec, rng: np.random.Generator) -> None:
    """Alpha-blend a textured object into `image` (in place)."""
    main = hsv_colour(rng, spec.hue, spec.hue_jitter, spec.saturation, spec.value)
    dark_value = (spec.value[0] * VALUE_DARK[0], spec.value[1] * VALUE_DARK[1])
    second = hsv_colour(rng, spec.hue, spec.hue_jitter, spec.saturation, dark_value)
    texture = object_texture(spec.texture, placed.u, placed.v, main, second, rng)
    light = rng.uniform(-0.2, 0.2, size=2)  # soft directional shading across the object
    texture *= (1.0 + light[0] * placed.u + light[1] * placed.v)[..., None]
    alpha = cv2.GaussianBlur(placed.mask.astype(np.float32), (0, 0), EDGE_SIGMA)[..., None]
    region = image[placed.rows, placed.cols]
    region += alpha * (texture - region)


def _random_colour(rng: np.random.Generator) -> tuple[float, float, float]:
    rgb = hsv_colour(rng, rng.uniform(0, 1), 0.0, (0.1, 0.9), (0.15, 0.95))
    return (float(rgb[0]), float(rgb[1]), float(rgb[2]))


def _draw_clutter(image: np.ndarray, rng: np.random.Generator) -> None:
    """Lines, small ellipses and rectangle outlines of any colour (in place)."""
    height, width = image.shape[:2]
    side = min(height, width)
    for _ in range(int(rng.integers(CLUTTER[0], CLUTTER[1] + 1))):
        kind = int(rng.integers(3))
        colour = _random_colour(rng)
        p0 = (int(rng.integers(width)), int(rng.integers(height)))
        if kind == 0:
            p1 = (int(rng.integers(width)), int(rng.integers(height)))
            cv2.line(image, p0, p1, colour, int(rng.integers(1, 4)), cv2.LINE_8)
        elif kind == 1:
            axes = tuple(int(a * side) + 2 for a in rng.uniform(0.01, 0.05, size=2))
            cv2.ellipse(image, p0, axes, float(rng.uniform(0, 180)), 0, 360, colour, -1, cv2.LINE_8)
        else:
            extent = rng.uniform(0.05, 0.2, size=2) * side
            p1 = (p0[0] + int(extent[0]), p0[1] + int(extent[1]))
            cv2.rectangle(image, p0, p1, colour, int(rng.integers(1, 3)), cv2.LINE_8)


def _draw_occluders(image: np.ndarray, owner: np.ndarray, rng: np.random.Generator) -> None:
    """Thin lines over everything; their pixels become background (in place)."""
    height, width = owner.shape
    for _ in range(int(rng.integers(OCCLUDERS[0], OCCLUDERS[1] + 1))):
        line = np.zeros((height, width), dtype=np.uint8)
        p0 = (int(rng.integers(width)), int(rng.integers(height)))
        p1 = (int(rng.integers(width)), int(rng.integers(height)))
        cv2.line(line, p0, p1, 1, int(rng.integers(2, 5)), cv2.LINE_8)
        hit = line.astype(bool)
        image[hit] = np.asarray(_random_colour(rng), dtype=np.float32)
        owner[hit] = -1


def _finish(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Lighting ramp and sensor noise, then float [0, 1] -> uint8."""
    height, width = image.shape[:2]
    gain_y, gain_x = rng.uniform(-LIGHT_GAIN, LIGHT_GAIN, size=2)
    ramp_y = 1.0 + gain_y * (np.arange(height, dtype=np.float32) / height - 0.5)
    ramp_x = 1.0 + gain_x * (np.arange(width, dtype=np.float32) / width - 0.5)
    image *= (ramp_y[:, None] * ramp_x[None, :])[..., None]
    noise = rng.standard_normal(image.shape, dtype=np.float32)
    noise *= np.float32(NOISE_SIGMA)
    image += noise
    np.clip(image, 0.0, 1.0, out=image)
    image *= np.float32(255.0)
    return np.rint(image, out=image).astype(np.uint8)


def _boundary_band(mask: np.ndarray) -> np.ndarray:
    """Set 255 where a pixel's neighbourhood holds two ids (2 px band along class boundaries)."""
    kernel = np.ones((BOUNDARY_KERNEL, BOUNDARY_KERNEL), dtype=np.uint8)
    # cv2's default border for dilate/erode is neutral, so the image edge is not a boundary.
    high, low = cv2.dilate(mask, kernel), cv2.erode(mask, kernel)
    out = mask.copy()
    out[high != low] = IGNORE_INDEX
    return out
