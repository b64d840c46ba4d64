"""Golden tests: every path that turns a file into pixels gives the same array and the same error.

Paths: `cosa.images.load_image` (cosa segment, cosa stream on image folders), `cosa.data.read_rgb`
(training, evaluation, INT8 calibration) and the Triton ensemble's pre-processing model exactly as
`cosa triton repo` ships it (its model.py and the decoder copied beside it, loaded from the
written repository with a stand-in for Triton's `triton_python_backend_utils`). The real server
runs the same files in tests/test_triton_server.py.
"""

from __future__ import annotations

import ast
import importlib.util
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from awkward_images import HEIGHT, WIDTH, write_awkward_images, write_bad_images
from test_triton_repo import make_artifact

from cosa.data import read_rgb
from cosa.errors import DataError
from cosa.images import ImageReadError, load_image
from cosa.serving.triton_repo import DECODER_MODULE, write_repository


@pytest.fixture(scope="module")
def awkward(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_awkward_images(tmp_path_factory.mktemp("awkward"))


@pytest.fixture(scope="module")
def bad(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_bad_images(tmp_path_factory.mktemp("bad"))


@pytest.fixture(scope="module")
def shipped(tmp_path_factory: pytest.TempPathFactory) -> types.ModuleType:
    """The pre-processing model.py of a written repository, imported as Triton's stub does:
    with its version folder on `sys.path`."""
    root = tmp_path_factory.mktemp("shipped")
    layout = write_repository(make_artifact(root / "artifact"), root / "repo", "python")
    assert layout.preprocess is not None
    version = layout.root / layout.preprocess / "1"
    assert sorted(p.name for p in version.iterdir()) == [f"{DECODER_MODULE}.py", "model.py"]
    saved_path, saved_modules = list(sys.path), dict(sys.modules)
    sys.modules["triton_python_backend_utils"] = types.ModuleType("triton_python_backend_utils")
    sys.modules.pop(DECODER_MODULE, None)
    sys.path.append(str(version))  # where the stub puts it: after site-packages
    try:
        spec = importlib.util.spec_from_file_location("shipped_preprocess", version / "model.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        decoder = sys.modules[DECODER_MODULE]
        assert Path(decoder.__file__).parent == version  # the copy, not the library's module
    finally:
        sys.path[:] = saved_path
        sys.modules.clear()
        sys.modules.update(saved_modules)
    return module


def ensemble_rgb(shipped: types.ModuleType, path: Path) -> np.ndarray:
    """What the ensemble feeds the network for `path`, back to uint8 (H, W, 3)."""
    batch = shipped.decode_request(np.array([[path.read_bytes()]], dtype=np.object_))
    assert batch.dtype == np.float32 and batch.shape[:2] == (1, 3)
    assert np.array_equal(batch, np.round(batch))  # whole 0-255 values: nothing was rescaled
    return batch[0].transpose(1, 2, 0).astype(np.uint8)


@pytest.mark.parametrize(
    "name", ["rgba", "grey_alpha", "grey16", "rgb16", "cmyk", "palette", "exif_rotated"]
)
def test_every_path_decodes_an_awkward_file_to_the_same_array(
    awkward: dict[str, Path], shipped: types.ModuleType, name: str
) -> None:
    path = awkward[name]
    local = load_image(path)
    shape = (WIDTH, HEIGHT, 3) if name == "exif_rotated" else (HEIGHT, WIDTH, 3)
    assert local.shape == shape and local.dtype == np.uint8
    assert len(np.unique(local)) > 16  # real content, not a constant
    np.testing.assert_array_equal(np.asarray(read_rgb(path)), local)  # training, eval, calib
    np.testing.assert_array_equal(ensemble_rgb(shipped, path), local)  # Triton ensemble


def test_the_policy_is_the_documented_one(awkward: dict[str, Path]) -> None:
    # Spot checks against hand computation, so that "the same" is not "the same wrong".
    from PIL import Image

    with Image.open(awkward["rgba"]) as image:
        rgba = np.asarray(image).astype(np.uint32)
    expected = (rgba[..., :3] * rgba[..., 3:] + 127) // 255  # composited onto black
    np.testing.assert_array_equal(load_image(awkward["rgba"]), expected)
    with Image.open(awkward["grey16"]) as image:
        grey = np.asarray(image).astype(np.uint32)
    np.testing.assert_array_equal(
        load_image(awkward["grey16"])[..., 1], (grey * 255 + 32767) // 65535
    )


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("empty", "empty file (0 bytes)"),
        ("text", "not an image (content is not JPEG, PNG, BMP, WebP or TIFF)"),
        ("truncated", "truncated or corrupt image data ("),
        ("float", "floating-point image (mode F) has no defined range"),
    ],
)
def test_every_path_gives_the_same_reason_for_a_bad_file(
    bad: dict[str, Path], shipped: types.ModuleType, name: str, reason: str
) -> None:
    path = bad[name]
    with pytest.raises(ImageReadError) as local:
        load_image(path)
    assert str(local.value) == f"{path}: {local.value.reason}"
    assert local.value.reason.startswith(reason)
    with pytest.raises(DataError) as data:
        read_rgb(path)
    assert str(path) in str(data.value) and local.value.reason in str(data.value)
    with pytest.raises(ValueError) as served:
        shipped.decode_request(np.array([[path.read_bytes()]], dtype=np.object_))
    assert str(served.value) == f"cannot decode image 0 of the request: {local.value.reason}"


def test_the_shipped_decoder_imports_nothing_from_cosa() -> None:
    # It runs inside Triton's stub, where cosa is not installed.
    from cosa import image_decode

    tree = ast.parse(Path(image_decode.__file__).read_text())
    imported = {
        alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    } | {
        (node.module or "").split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom)
    }
    assert imported <= {"__future__", "io", "struct", "typing", "numpy", "PIL"}
