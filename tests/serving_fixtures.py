"""Shared test doubles for the local serving tests (tests/test_serving_local_*, test_segment_*,
test_stream_*, test_artifact_choice, test_benchmark): the tiny real model exported once, a fast
content-dependent fake runner, and export folders of one-Conv graphs written in milliseconds.

The tiny model is the real deploy network (`DeployModel` of a ViT-Ti/16 cut to its first
`model_fixtures.KEEP_BLOCKS` blocks, with a 16-channel decoder, 3 foreground classes, random
weights from a fixed seed), exported with the dynamo exporter and dynamic N, H, W. The export
takes a few seconds, so it runs once per session and is kept in pytest's cache folder
(`.pytest_cache/d/...`) under a key that hashes the model sources and the torch/onnx versions:
any change to them exports again. Its checkpoint holds the whole 12-block network; loaders cut
it as the export was cut while `loading_shallow()` is active.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest

from cosa.errors import InputError
from cosa.export.layout import FILES, Role
from cosa.export.spec import INPUT_NAME, LOGITS_NAME, MASK_NAME, ModelSpec, write_spec
from cosa.images import voc_palette

CLASS_NAMES = ("background", "circle", "square", "triangle")
PALETTE = ((0, 0, 0), (200, 30, 30), (30, 200, 30), (30, 30, 200))
TINY_SPEC = ModelSpec(class_names=CLASS_NAMES, palette=PALETTE, precision="fp32", opset=18)


@dataclass(frozen=True)
class TinyArtifacts:
    """`folder`: spec.json + model.onnx; `checkpoint`: the same weights as a cosa checkpoint, at
    full depth (load it inside `loading_shallow()` to get the exported network)."""

    folder: Path
    checkpoint: Path


_MEMO: dict[str, TinyArtifacts] = {}


def _cache_key() -> str:
    """Hash of the model sources and library versions, without importing torch (slow)."""
    versions = " ".join(metadata.version(name) for name in ("torch", "onnx", "timm"))
    digest = hashlib.sha256(f"{versions} v2".encode())
    spec = importlib.util.find_spec("cosa.model")
    if spec is None or spec.origin is None:
        pytest.skip("cosa.model is not available")
    for source in sorted(Path(spec.origin).parent.glob("*.py")):
        digest.update(source.read_bytes())
    return digest.hexdigest()[:16]


def _build(dest: Path) -> None:
    import torch
    from model_fixtures import cut_vit, save_net_checkpoint

    from cosa.config import ModelConfig
    from cosa.export.spec import INPUT_NAME, LOGITS_NAME, write_spec
    from cosa.model import DeployModel, build_model

    model_cfg = ModelConfig(backbone="vit_tiny_patch16", decoder_channels=16)
    torch.manual_seed(0)
    net = build_model(model_cfg, num_classes=len(CLASS_NAMES) - 1, load_pretrained=False).eval()
    # A private folder, renamed into place when complete: concurrent sessions never see half.
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    (tmp / "export").mkdir()
    save_net_checkpoint(net, model_cfg, CLASS_NAMES, PALETTE, tmp / "tiny.pt")
    cut_vit(net)
    dim = torch.export.Dim.DYNAMIC
    with torch.no_grad():
        torch.onnx.export(
            DeployModel(net).eval(),
            (torch.rand(2, 3, 48, 64) * 255,),  # N = 2, H != W: no dim specialises to a constant
            str(tmp / "export" / "model.onnx"),
            dynamo=True,
            input_names=[INPUT_NAME],
            output_names=[LOGITS_NAME, MASK_NAME],
            dynamic_shapes=({0: dim, 2: dim, 3: dim},),
            opset_version=18,
            external_data=False,
            verbose=False,
        )
    write_spec(TINY_SPEC, tmp / "export")
    try:
        tmp.rename(dest)
    except OSError:  # another session finished the same key first
        shutil.rmtree(tmp, ignore_errors=True)
    for stale in dest.parent.iterdir():  # exports of older model sources (~25 MB each)
        if stale.name != dest.name and not stale.name.startswith("."):
            shutil.rmtree(stale, ignore_errors=True)


def tiny_artifacts(
    config: pytest.Config, tmp_path_factory: pytest.TempPathFactory
) -> TinyArtifacts:
    """The tiny model's export folder and checkpoint, built at most once per cache key."""
    key = _cache_key()
    if key not in _MEMO:
        cache = getattr(config, "cache", None)
        root = (
            cache.mkdir("cosa_serving_tiny")
            if cache is not None
            else tmp_path_factory.mktemp("tiny")
        )
        dest = root / key
        if not (dest / "export" / "model.onnx").is_file():
            _build(dest)
        _MEMO[key] = TinyArtifacts(folder=dest / "export", checkpoint=dest / "tiny.pt")
    return _MEMO[key]


@contextlib.contextmanager
def loading_shallow() -> Iterator[None]:
    """While active, every checkpoint loaded for inference (the torch runner, `cosa benchmark`'s
    checkpoint row) has its ViT cut as the tiny export's was (`model_fixtures.shallow_loader`)."""
    from model_fixtures import shallow_loader

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("cosa.checkpoint.load_deploy_model", shallow_loader)
        yield


class FakeRunner:
    """A fast runner whose mask is a function of each pixel: id = R // 64 (0-3).

    Lets pipeline tests check that each mask file belongs to its image (and its orientation)
    without a model. Records every batch shape; `delay` simulates inference time.
    """

    def __init__(self, delay: float = 0.0) -> None:
        self.spec = TINY_SPEC
        self.batches: list[tuple[int, ...]] = []
        self.delay = delay
        self.closed = False

    def infer(self, images: np.ndarray) -> dict[str, np.ndarray]:
        assert images.dtype == np.float32 and images.ndim == 4 and images.shape[1] == 3
        self.batches.append(images.shape)
        if self.delay:
            time.sleep(self.delay)
        return {MASK_NAME: expected_fake_mask_nchw(images)}

    def close(self) -> None:
        self.closed = True


class ParallelRunner(FakeRunner):
    """A runner double with `parallel_calls`: records the most `infer` calls running at once.

    The first `meet` calls wait for each other (a barrier: the code under test must run that many
    at once, or the first call fails after `deadline_s`) and then finish in reverse order of
    entry, so results come back out of order; later calls run straight through. Batches
    `fail_width` pixels wide raise `InputError` (like an input outside a TensorRT profile).
    """

    def __init__(
        self, parallel_calls: int, meet: int, fail_width: int | None = None, deadline_s: float = 60
    ) -> None:
        super().__init__()
        self.parallel_calls = parallel_calls
        self.fail_width = fail_width
        self.meet = meet
        self.deadline_s = deadline_s
        self.barrier = threading.Barrier(meet, timeout=deadline_s)
        self.changed = threading.Condition()
        self.entered = 0
        self.met_and_done = 0  # of the first `meet` calls
        self.running = 0
        self.peak = 0

    def infer(self, images: np.ndarray) -> dict[str, np.ndarray]:
        with self.changed:
            self.running += 1
            self.peak = max(self.peak, self.running)
            order = self.entered
            self.entered += 1
        try:
            if order < self.meet:
                self.barrier.wait()
                with self.changed:  # the last to enter finishes first
                    turn = self.meet - 1 - order
                    if not self.changed.wait_for(
                        lambda: self.met_and_done == turn, self.deadline_s
                    ):
                        raise TimeoutError("the calls that met never finished")
            if images.shape[-1] == self.fail_width:
                raise InputError(f"width {self.fail_width} is outside the engine's profile")
            return super().infer(images)
        finally:
            with self.changed:
                self.running -= 1
                if order < self.meet:
                    self.met_and_done += 1
                    self.changed.notify_all()


def expected_fake_mask_nchw(images: np.ndarray) -> np.ndarray:
    """FakeRunner's mask for float32 (N, 3, H, W) -> int32 (N, H, W)."""
    return (images[:, 0] // 64).astype(np.int32)


def expected_fake_mask(rgb: np.ndarray) -> np.ndarray:
    """FakeRunner's mask for one uint8 (H, W, 3) image -> (H, W)."""
    return (rgb[..., 0] // 64).astype(np.int32)


# ------------------------------------------------------------------------ one-Conv export folders

# Roles each export precision writes besides model.onnx (cosa.export.pipeline).
WRITTEN = {
    "fp32": (Role.FP32, Role.FP32_ORT),
    "fp16": (Role.FP32, Role.FP32_ORT, Role.FP16),
    "int8": (Role.FP32, Role.FP32_ORT, Role.INT8, Role.INT8_CPU),
}


def conv_graph(path: Path, scale: float) -> None:
    """A deploy graph: 1x1 Conv of the RGB input to K logits (weights times `scale`), argmax;
    K is the synthetic benchmark's class count."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from cosa.data import SYNTH_CLASSES

    k = len(SYNTH_CLASSES)
    weight = np.random.default_rng(0).normal(size=(k, 3, 1, 1)).astype(np.float32) * scale
    graph = helper.make_graph(
        [
            helper.make_node("Conv", [INPUT_NAME, "weight"], [LOGITS_NAME]),
            helper.make_node("ArgMax", [LOGITS_NAME], ["ids"], axis=1, keepdims=0),
            helper.make_node("Cast", ["ids"], [MASK_NAME], to=TensorProto.INT32),
        ],
        "conv",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["N", 3, "H", "W"])],
        [
            helper.make_tensor_value_info(LOGITS_NAME, TensorProto.FLOAT, ["N", k, "H", "W"]),
            helper.make_tensor_value_info(MASK_NAME, TensorProto.INT32, ["N", "H", "W"]),
        ],
        [numpy_helper.from_array(weight, "weight")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def make_export(folder: Path, precision: str, plan: bool) -> Path:
    """An export folder as `cosa export --precision P [--trt]` lays it out, with the synthetic
    benchmark's classes; every ONNX file a `conv_graph` of its own weights."""
    from cosa.data import SYNTH_CLASSES

    folder.mkdir(parents=True)
    roles = list(WRITTEN[precision])
    for i, role in enumerate(roles):
        conv_graph(folder / FILES[role], scale=1.0 + i)
    if plan:
        (folder / FILES[Role.TENSORRT]).write_bytes(b"engine bytes")
        roles.append(Role.TENSORRT)
    primary = (
        Role.TENSORRT if plan else {"fp32": Role.FP32, "fp16": Role.FP16}.get(precision, Role.INT8)
    )
    palette = tuple(tuple(int(c) for c in rgb) for rgb in voc_palette(len(SYNTH_CLASSES)))
    spec = ModelSpec(
        class_names=SYNTH_CLASSES,
        palette=palette,
        precision=precision,
        artifact=FILES[primary],
        extra_artifacts={str(role): FILES[role] for role in roles},
    )
    write_spec(spec, folder)
    return folder
