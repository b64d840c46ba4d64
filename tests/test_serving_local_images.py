"""`cosa.images.load_image`: every kind of image and every kind of bad file of issue 5."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cosa.errors import InputError
from cosa.images import ImageReadError, load_image

RNG = np.random.default_rng(0)


def rgb_array(height: int, width: int) -> np.ndarray:
    return RNG.integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def save(array: np.ndarray, path: Path, **kwargs: object) -> Path:
    Image.fromarray(array).save(path, **kwargs)
    return path


# ------------------------------------------------------------------------------------ good images


@pytest.mark.parametrize("suffix", [".png", ".bmp", ".tif", ".tiff", ".webp", ".PNG", ".TIF"])
def test_lossless_formats_decode_exactly(tmp_path: Path, suffix: str) -> None:
    array = rgb_array(13, 21)
    kwargs = {"lossless": True} if suffix.lower() == ".webp" else {}
    got = load_image(save(array, tmp_path / f"a{suffix}", **kwargs))
    assert got.dtype == np.uint8 and got.shape == (13, 21, 3) and got.flags.c_contiguous
    np.testing.assert_array_equal(got, array)


def test_jpeg_with_upper_case_suffix(tmp_path: Path) -> None:
    array = np.full((16, 24, 3), (200, 100, 50), dtype=np.uint8)
    got = load_image(save(array, tmp_path / "a.JPEG", quality=95))
    assert got.shape == (16, 24, 3)
    assert np.abs(got.astype(int) - array).max() <= 3


def test_content_decides_not_the_suffix(tmp_path: Path) -> None:
    array = rgb_array(5, 7)
    png_named_jpg = tmp_path / "really_png.jpg"
    save(array, png_named_jpg, format="PNG")
    np.testing.assert_array_equal(load_image(png_named_jpg), array)


def test_grayscale_becomes_three_equal_channels(tmp_path: Path) -> None:
    gray = RNG.integers(0, 256, size=(9, 11), dtype=np.uint8)
    got = load_image(save(gray, tmp_path / "g.png"))
    assert got.shape == (9, 11, 3)
    for c in range(3):
        np.testing.assert_array_equal(got[..., c], gray)


def test_one_bit_image(tmp_path: Path) -> None:
    img = Image.new("1", (6, 4), 0)
    img.putpixel((2, 1), 1)
    img.save(tmp_path / "b.bmp")
    got = load_image(tmp_path / "b.bmp")
    assert got.shape == (4, 6, 3)
    assert got[1, 2].tolist() == [255, 255, 255] and got[0, 0].tolist() == [0, 0, 0]


def test_rgba_is_composited_on_black(tmp_path: Path) -> None:
    rgba = np.zeros((2, 3, 4), dtype=np.uint8)
    rgba[0, 0] = (10, 20, 30, 255)  # opaque: unchanged
    rgba[0, 1] = (200, 100, 50, 128)  # half: scaled by 128/255
    rgba[0, 2] = (255, 255, 255, 0)  # transparent: black whatever it hides
    got = load_image(save(rgba, tmp_path / "a.png"))
    assert got[0, 0].tolist() == [10, 20, 30]
    assert got[0, 1].tolist() == [100, 50, 25]
    assert got[0, 2].tolist() == [0, 0, 0]


def test_la_image(tmp_path: Path) -> None:
    Image.new("LA", (4, 3), (200, 255)).save(tmp_path / "la.png")
    got = load_image(tmp_path / "la.png")
    assert got.shape == (3, 4, 3) and (got == 200).all()


def test_palette_image_with_and_without_transparency(tmp_path: Path) -> None:
    img = Image.new("P", (4, 2), 1)
    img.putpalette([0, 0, 0, 250, 10, 20, 1, 2, 3])
    img.putpixel((0, 0), 2)
    img.save(tmp_path / "p.png")
    got = load_image(tmp_path / "p.png")
    assert got[0, 1].tolist() == [250, 10, 20] and got[0, 0].tolist() == [1, 2, 3]

    img.save(tmp_path / "pt.png", transparency=1)  # index 1 fully transparent
    got = load_image(tmp_path / "pt.png")
    assert got[0, 1].tolist() == [0, 0, 0] and got[0, 0].tolist() == [1, 2, 3]


@pytest.mark.parametrize("suffix", [".jpg", ".tif"])
def test_cmyk_is_converted_to_rgb(tmp_path: Path, suffix: str) -> None:
    Image.new("CMYK", (8, 6), (0, 255, 255, 0)).save(tmp_path / f"c{suffix}")  # pure red
    got = load_image(tmp_path / f"c{suffix}")
    assert got.shape == (6, 8, 3)
    r, g, b = got.reshape(-1, 3).mean(axis=0)
    assert r > 240 and g < 15 and b < 15


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16_bit_grayscale_is_scaled_not_clipped(tmp_path: Path, suffix: str) -> None:
    values = np.array([[0, 257, 32768, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / f"d{suffix}")
    assert Image.open(tmp_path / f"d{suffix}").mode.startswith("I;16")
    got = load_image(tmp_path / f"d{suffix}")
    assert got[..., 0].tolist() == [[0, 1, 128, 255]]


def test_16_bit_rgb_png(tmp_path: Path) -> None:
    import cv2

    bgr16 = np.zeros((2, 2, 3), dtype=np.uint16)
    bgr16[..., 2] = 65535  # red in OpenCV's BGR order
    bgr16[..., 1] = 32896  # 128.5 * 256
    cv2.imwrite(str(tmp_path / "c16.png"), bgr16)
    got = load_image(tmp_path / "c16.png")
    assert got[0, 0].tolist() == [255, 128, 0]


def test_32_bit_integer_out_of_16_bit_range_is_refused(tmp_path: Path) -> None:
    Image.new("I", (3, 3), 70000).save(tmp_path / "i.tif")
    with pytest.raises(ImageReadError, match="outside 0-65535"):
        load_image(tmp_path / "i.tif")


def test_float_image_is_refused(tmp_path: Path) -> None:
    Image.new("F", (3, 3), 0.5).save(tmp_path / "f.tif")
    with pytest.raises(ImageReadError, match="floating-point"):
        load_image(tmp_path / "f.tif")


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_exif_orientation_is_applied(tmp_path: Path, suffix: str) -> None:
    array = rgb_array(20, 40)  # stored 40 wide, 20 high
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = tmp_path / f"rot{suffix}"
    Image.fromarray(array).save(path, exif=exif, **({"quality": 100} if suffix == ".jpg" else {}))
    got = load_image(path)
    assert got.shape == (40, 20, 3)  # displayed: 20 wide, 40 high
    if suffix == ".png":
        np.testing.assert_array_equal(got, np.rot90(array, k=-1))


def test_one_pixel_and_very_wide_images(tmp_path: Path) -> None:
    assert load_image(save(np.full((1, 1, 3), 7, np.uint8), tmp_path / "1.png")).shape == (1, 1, 3)
    wide = rgb_array(16, 2000)
    np.testing.assert_array_equal(load_image(save(wide, tmp_path / "w.png")), wide)


def test_large_image(tmp_path: Path) -> None:
    big = np.zeros((3000, 4000, 3), np.uint8)
    big[::7, ::5] = 255
    assert load_image(save(big, tmp_path / "big.jpg", quality=75)).shape == (3000, 4000, 3)


def test_decompression_bomb_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = save(np.zeros((100, 120, 3), np.uint8), tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5000)  # 12000 px > 2x: Pillow itself raises
    with pytest.raises(ImageReadError, match="decompression bomb"):
        load_image(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10000)  # 1x-2x: Pillow only warns; we refuse
    with pytest.warns(Image.DecompressionBombWarning), pytest.raises(ImageReadError) as info:
        load_image(path)
    assert (
        "120x100 = 12000 pixels is above the decompression-bomb limit of 10000" in info.value.reason
    )


def test_names_with_spaces_and_non_ascii(tmp_path: Path) -> None:
    array = rgb_array(4, 5)
    path = save(array, tmp_path / "été photo 猫.png")
    np.testing.assert_array_equal(load_image(path), array)


# -------------------------------------------------------------------------------------- bad files


def test_truncated_files(tmp_path: Path) -> None:
    for suffix in (".png", ".jpg"):
        full = save(rgb_array(64, 64), tmp_path / f"full{suffix}")
        cut = tmp_path / f"cut{suffix}"
        cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
        with pytest.raises(ImageReadError, match="truncated or corrupt") as info:
            load_image(cut)
        assert info.value.path == str(cut) and str(cut) in str(info.value)


def test_empty_file(tmp_path: Path) -> None:
    (tmp_path / "e.jpg").touch()
    with pytest.raises(ImageReadError, match=r"empty file \(0 bytes\)"):
        load_image(tmp_path / "e.jpg")


def test_non_image_with_image_suffix(tmp_path: Path) -> None:
    (tmp_path / "notes.png").write_text("not an image at all\n")
    with pytest.raises(ImageReadError, match="not an image"):
        load_image(tmp_path / "notes.png")


def test_formats_outside_the_list_are_refused_even_when_renamed(tmp_path: Path) -> None:
    Image.new("RGB", (4, 4)).save(tmp_path / "anim.png", format="GIF")
    with pytest.raises(ImageReadError, match="not an image"):
        load_image(tmp_path / "anim.png")


def test_dangling_symlink(tmp_path: Path) -> None:
    link = tmp_path / "gone.jpg"
    link.symlink_to(tmp_path / "missing.jpg")
    with pytest.raises(ImageReadError, match="dangling symlink"):
        load_image(link)


def test_folder_named_like_an_image(tmp_path: Path) -> None:
    (tmp_path / "dir.jpg").mkdir()
    with pytest.raises(ImageReadError, match="is a folder"):
        load_image(tmp_path / "dir.jpg")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ImageReadError, match="no such file"):
        load_image(tmp_path / "nope.png")


def test_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    # Also the unreadable-file check that works as root (root reads chmod-000 files).
    os.mkfifo(tmp_path / "pipe.png")
    with pytest.raises(ImageReadError, match="not a regular file"):
        load_image(tmp_path / "pipe.png")


def test_unreadable_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The error a mode-000 file gives, raised by the decoder's open: root (as CI runs) reads
    # files whatever their mode, so a real chmod would prove nothing there.
    path = save(rgb_array(4, 4), tmp_path / "locked.png")
    real_open = open

    def guarded_open(file: object, *args: object, **kwargs: object) -> object:
        if Path(str(file)) == path:
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr("cosa.images.open", guarded_open, raising=False)
    with pytest.raises(ImageReadError, match=r"locked\.png.*permission denied; make the file"):
        load_image(path)
    monkeypatch.undo()
    assert load_image(path).shape == (4, 4, 3)  # the same file reads once it is readable


def test_read_errors_are_input_errors(tmp_path: Path) -> None:
    assert issubclass(ImageReadError, InputError)
