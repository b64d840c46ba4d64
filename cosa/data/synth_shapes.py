"""Shape families of the synthetic benchmark, as boolean masks in object coordinates.

Each shape is drawn in its own frame (u, v): the object's centre at the origin, its extent about the
unit disc, rotation and aspect already applied by the caller. Shapes with free parameters (ring
width, star depth, blob outline, ...) draw them from the generator per instance, so two instances of
one class differ.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

ShapeFn = Callable[[np.ndarray, np.ndarray, np.random.Generator], np.ndarray]


def _disc(u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return u * u + v * v <= 1.0


def _ring(u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    inner = rng.uniform(0.45, 0.65)
    r2 = u * u + v * v
    return (r2 <= 1.0) & (r2 >= inner * inner)


def _star(u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    points = 5
    inner = rng.uniform(0.38, 0.5)
    phase = (np.arctan2(v, u) * points / (2 * np.pi)) % 1.0  # 0 at a tip, 0.5 between tips
    edge = inner + (1.0 - inner) * np.abs(phase - 0.5) * 2.0
    return np.hypot(u, v) <= edge


def _cross(u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    arm = rng.uniform(0.25, 0.35)  # half width of each arm
    au, av = np.abs(u), np.abs(v)
    return ((au <= arm) & (av <= 1.0)) | ((au <= 1.0) & (av <= arm))


def _triangle(u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    inside = np.ones(u.shape, dtype=bool)
    for k in range(3):  # equilateral, inscribed in the unit circle: in-radius 0.5
        angle = -np.pi / 2 + 2 * np.pi * k / 3
        inside &= u * np.cos(angle) + v * np.sin(angle) <= 0.5
    return inside


def _crescent(u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    offset = rng.uniform(0.35, 0.55)
    bite = rng.uniform(0.75, 0.9)
    return (u * u + v * v <= 1.0) & ((u - offset) ** 2 + v * v >= bite * bite)


def _blob(u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    theta = np.arctan2(v, u)
    edge = np.full(u.shape, 0.75)
    for harmonic in (2, 3, 4):  # a smooth random outline, different for every instance
        amplitude, phase = rng.uniform(0.05, 0.15), rng.uniform(0, 2 * np.pi)
        edge += 0.75 * amplitude * np.cos(harmonic * theta + phase)
    return np.hypot(u, v) <= edge


def _bar(u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    half_height = rng.uniform(0.22, 0.32)
    return (np.abs(u) <= 1.0) & (np.abs(v) <= half_height)


def _hexagon(u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    apothem = np.sqrt(3.0) / 2.0  # circumradius 1
    au, av = np.abs(u), np.abs(v)
    return (av <= apothem) & (0.5 * av + apothem * au <= apothem)


def _diamond(u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.abs(u) + np.abs(v) / rng.uniform(0.5, 0.65) <= 1.0


def _rectangle(u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    # Not a class: used for textured background distractors, so texture alone is not enough.
    return (np.abs(u) <= 0.9) & (np.abs(v) <= rng.uniform(0.65, 0.9))


SHAPES: dict[str, ShapeFn] = {
    "disc": _disc,
    "ring": _ring,
    "star": _star,
    "cross": _cross,
    "triangle": _triangle,
    "crescent": _crescent,
    "blob": _blob,
    "bar": _bar,
    "hexagon": _hexagon,
    "diamond": _diamond,
    "rectangle": _rectangle,
}
"""Shape name -> fn(u, v, rng) -> bool mask of u's shape; the shape lies within the unit disc
(the rectangle within [-0.9, 0.9]^2)."""


def shape_mask(shape: str, u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Rasterise one shape.

    Args:
        shape: a key of `SHAPES`.
        u, v: float arrays (h, w), object-frame coordinates of the pixel centres (unit = the
            object's radius).
        rng: draws the instance's free parameters.

    Returns:
        bool (h, w), True inside the shape.

    Raises:
        KeyError: unknown shape (a programming error: class specs are module constants).
    """
    return SHAPES[shape](u, v, rng)
