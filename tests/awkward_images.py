"""Image files that decoders disagree on, and files that do not decode, for the golden tests that
every path (segment, stream, training, evaluation, calibration, the Triton ensemble) decodes alike.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

HEIGHT, WIDTH = 24, 40  # displayed size of every good file but the EXIF-rotated one (40 x 24)


def write_awkward_images(folder: Path) -> dict[str, Path]:
    """RGBA, LA, 16-bit grey and RGB PNGs, CMYK JPEG, palette + transparency, EXIF-rotated JPEG."""
    import cv2

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    rgb = rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    alpha = rng.integers(0, 256, (HEIGHT, WIDTH, 1), dtype=np.uint8)
    files = {
        "rgba": folder / "rgba.png",
        "grey_alpha": folder / "grey_alpha.png",
        "grey16": folder / "grey16.png",
        "rgb16": folder / "rgb16.png",
        "cmyk": folder / "cmyk.jpg",
        "palette": folder / "palette.png",
        "exif_rotated": folder / "exif_rotated.jpg",
    }
    Image.fromarray(np.concatenate([rgb, alpha], axis=2), "RGBA").save(files["rgba"])
    grey = np.concatenate([rgb[..., :1], alpha], axis=2)
    Image.fromarray(grey, "LA").save(files["grey_alpha"])
    Image.fromarray(rng.integers(0, 65536, (HEIGHT, WIDTH), dtype=np.uint16)).save(files["grey16"])
    cv2.imwrite(str(files["rgb16"]), rng.integers(0, 65536, (HEIGHT, WIDTH, 3), dtype=np.uint16))
    Image.fromarray(rgb).convert("CMYK").save(files["cmyk"], quality=90)
    Image.fromarray(rgb).quantize(16).save(files["palette"], transparency=3)
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated by 90 degrees: 40 x 24 stored, 24 x 40 shown
    Image.fromarray(rgb).save(files["exif_rotated"], quality=90, exif=exif.tobytes())
    return files


def write_bad_images(folder: Path) -> dict[str, Path]:
    """Empty, not an image, truncated PNG, floating-point TIFF."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {
        "empty": folder / "empty.png",
        "text": folder / "notes.jpg",
        "truncated": folder / "truncated.png",
        "float": folder / "float.tif",
    }
    files["empty"].write_bytes(b"")
    files["text"].write_text("not an image\n")
    Image.fromarray(np.zeros((64, 64, 3), np.uint8) + 90).save(files["truncated"])
    files["truncated"].write_bytes(files["truncated"].read_bytes()[:60])
    Image.new("F", (5, 4), 0.5).save(files["float"])
    return files
