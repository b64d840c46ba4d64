"""Textures and background contexts of the synthetic benchmark, vectorised with numpy/OpenCV.

All images here are float32 RGB in [0, 1] (values may leave that range slightly before the final
clip). Colours are drawn in HSV so a class's colour distribution is a hue band with ranges of
saturation and value, not one flat colour.
"""

from __future__ import annotations

import colorsys

import cv2
import numpy as np

TEXTURES = ("noise", "stripes", "checker", "dots", "gradient")
"""Object texture families: smooth noise, oriented stripes, a checkerboard, a dot lattice, a
ramp."""

CONTEXTS = ("water", "grass", "brick", "sand", "sky", "tiles")
"""Background contexts: each a procedural texture with its own colour statistics."""


def hsv_colour(
    rng: np.random.Generator,
    hue: float,
    hue_jitter: float,
    saturation: tuple[float, float],
    value: tuple[float, float],
) -> np.ndarray:
    """One RGB colour from an HSV band.

    Args:
        hue: band centre in turns (0 = red, 1/3 = green, 2/3 = blue); wraps around.
        hue_jitter: half width of the band, in turns.
        saturation, value: (low, high) uniform ranges in [0, 1].

    Returns:
        float32 (3,) RGB in [0, 1].
    """
    h = (hue + rng.uniform(-hue_jitter, hue_jitter)) % 1.0
    rgb = colorsys.hsv_to_rgb(h, rng.uniform(*saturation), rng.uniform(*value))
    return np.asarray(rgb, dtype=np.float32)


def smooth_noise(
    rng: np.random.Generator, height: int, width: int, cell_h: float, cell_w: float | None = None
) -> np.ndarray:
    """Value noise: a coarse Gaussian grid upsampled bicubically.

    Args:
        height, width: output size in pixels.
        cell_h, cell_w: grid spacing in pixels (cell_w defaults to cell_h); unequal cells give
            streaks (tall cells: vertical streaks).

    Returns:
        float32 (height, width), roughly zero mean, unit scale.
    """
    cell_w = cell_h if cell_w is None else cell_w
    grid_h = max(2, int(np.ceil(height / max(cell_h, 1.0))) + 2)
    grid_w = max(2, int(np.ceil(width / max(cell_w, 1.0))) + 2)
    grid = rng.standard_normal((grid_h, grid_w)).astype(np.float32)
    return cv2.resize(grid, (width, height), interpolation=cv2.INTER_CUBIC)


def _mix(c1: np.ndarray, c2: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Per-pixel blend of colours (3,) or images (h, w, 3) with weights t (h, w) in [0, 1].

    Returns:
        float32 (h, w, 3) c1 * (1 - t) + c2 * t.
    """
    t = t[..., None].astype(np.float32, copy=False)
    return c1 + (c2 - c1) * t


def object_texture(
    texture: str,
    u: np.ndarray,
    v: np.ndarray,
    c1: np.ndarray,
    c2: np.ndarray,
    rng: np.random.Generator,
) -> np.ndarray:
    """Paint a texture in object coordinates, so it turns and scales with the object.

    Args:
        texture: one of `TEXTURES`.
        u, v: float (h, w) object-frame coordinates (unit = object radius).
        c1, c2: float32 (3,) the two colours of the pattern.
        rng: draws frequency, orientation and phase.

    Returns:
        float32 (h, w, 3) RGB.

    Raises:
        KeyError: unknown texture (a programming error).
    """
    angle = rng.uniform(0, np.pi)
    along = u * np.cos(angle) + v * np.sin(angle)
    if texture == "stripes":
        freq = rng.uniform(2.0, 3.5)  # periods per object radius
        wave = np.sin(2 * np.pi * freq * along + rng.uniform(0, 2 * np.pi))
        t = np.clip(wave * 1.5 + 0.5, 0.0, 1.0)
    elif texture == "checker":
        freq = rng.uniform(1.5, 2.5)
        across = -u * np.sin(angle) + v * np.cos(angle)
        t = (np.floor(along * freq) + np.floor(across * freq)) % 2
    elif texture == "dots":
        freq = rng.uniform(2.5, 4.0)
        across = -u * np.sin(angle) + v * np.cos(angle)
        du = (along * freq) % 1.0 - 0.5
        dv = (across * freq) % 1.0 - 0.5
        t = (du * du + dv * dv <= rng.uniform(0.22, 0.32) ** 2).astype(np.float32)
    elif texture == "gradient":
        t = np.clip((along + 1.0) / 2.0, 0.0, 1.0)
    elif texture == "noise":
        scale = max(2.0, u.shape[0] / 6.0)  # about six blobs across the box
        noise = smooth_noise(rng, u.shape[0], u.shape[1], scale)
        t = np.clip(noise * 0.5 + 0.5, 0.0, 1.0)
    else:
        raise KeyError(f"unknown texture {texture!r}; choose one of {TEXTURES}")
    out = _mix(c1, c2, t)
    grain = rng.standard_normal(u.shape, dtype=np.float32) * np.float32(0.035)  # grain
    return out + grain[..., None]


def context_background(
    context: str, height: int, width: int, rng: np.random.Generator
) -> np.ndarray:
    """Paint a whole-image background of one context.

    Args:
        context: one of `CONTEXTS`.
        height, width: image size in pixels.
        rng: draws colours, scales and noise.

    Returns:
        float32 (height, width, 3) RGB.

    Raises:
        KeyError: unknown context (a programming error).
    """
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    if context == "water":
        deep = hsv_colour(rng, 0.57, 0.03, (0.55, 0.85), (0.35, 0.55))
        light = hsv_colour(rng, 0.53, 0.03, (0.35, 0.6), (0.6, 0.85))
        wavelength = rng.uniform(10.0, 26.0)
        warp = smooth_noise(rng, height, width, 40.0) * 0.35
        wave = np.sin(2 * np.pi * (yy / wavelength + warp))
        img = _mix(deep, light, 0.5 + 0.5 * wave)
        sparkle = smooth_noise(rng, height, width, 12.0) > 0.8
        glint = np.clip((wave - 0.85) * 4.0, 0.0, 1.0) * sparkle
        img += glint[..., None] * 0.35
    elif context == "grass":
        dark = hsv_colour(rng, 0.28, 0.04, (0.55, 0.85), (0.25, 0.45))
        light = hsv_colour(rng, 0.25, 0.04, (0.45, 0.75), (0.55, 0.8))
        blades = smooth_noise(rng, height, width, rng.uniform(18.0, 30.0), rng.uniform(1.5, 3.0))
        patches = smooth_noise(rng, height, width, 70.0)
        img = _mix(dark, light, np.clip(0.5 + 0.3 * blades + 0.2 * patches, 0.0, 1.0))
    elif context == "brick":
        brick = hsv_colour(rng, 0.02, 0.02, (0.45, 0.7), (0.45, 0.65))
        mortar = hsv_colour(rng, 0.1, 0.05, (0.05, 0.2), (0.6, 0.8))
        row_h = rng.uniform(14.0, 26.0)
        brick_w = row_h * rng.uniform(2.0, 2.6)
        row = np.floor(yy / row_h)
        shifted = xx + (row % 2) * brick_w / 2
        col = np.floor(shifted / brick_w)
        shade_table = rng.uniform(0.8, 1.15, size=997).astype(np.float32)
        shade = shade_table[((row * 131 + col * 7) % 997).astype(np.int64)]
        joint = ((yy % row_h) < 2.0) | ((shifted % brick_w) < 2.0)
        img = brick * shade[..., None]
        img[joint] = mortar
        img += smooth_noise(rng, height, width, 6.0)[..., None] * 0.03
    elif context == "sand":
        base = hsv_colour(rng, 0.1, 0.02, (0.25, 0.45), (0.7, 0.88))
        shadow = hsv_colour(rng, 0.08, 0.02, (0.3, 0.5), (0.5, 0.65))
        dunes = np.sin(
            2 * np.pi * (xx * 0.3 + yy) / rng.uniform(40.0, 80.0)
            + smooth_noise(rng, height, width, 60.0)
        )
        img = _mix(base, shadow, np.clip(0.35 + 0.3 * dunes, 0.0, 1.0))
        img += rng.standard_normal((height, width, 1), dtype=np.float32) * np.float32(0.06)
    elif context == "sky":
        top = hsv_colour(rng, 0.6, 0.03, (0.45, 0.75), (0.7, 0.9))
        bottom = hsv_colour(rng, 0.57, 0.03, (0.1, 0.3), (0.85, 1.0))
        img = _mix(top, bottom, yy / max(height - 1, 1))
        clouds = np.clip(smooth_noise(rng, height, width, rng.uniform(40.0, 70.0)) - 0.3, 0.0, 1.0)
        img = _mix(img, np.full(3, 0.97, np.float32), clouds)
    elif context == "tiles":
        tile = rng.uniform(24.0, 48.0)
        grout = hsv_colour(rng, 0.1, 0.5, (0.0, 0.15), (0.2, 0.35))
        base = hsv_colour(rng, 0.1, 0.5, (0.0, 0.12), (0.5, 0.8))
        ti, tj = np.floor(yy / tile), np.floor(xx / tile)
        shade_table = rng.uniform(0.85, 1.15, size=991).astype(np.float32)
        img = base * shade_table[((ti * 37 + tj * 11) % 991).astype(np.int64)][..., None]
        img[((yy % tile) < 2.5) | ((xx % tile) < 2.5)] = grout
    else:
        raise KeyError(f"unknown context {context!r}; choose one of {CONTEXTS}")
    return img.astype(np.float32)
