"""A fake TensorRT runtime and a fake CUDA placement, for the engine session without a GPU.

`FakeEngine` is just enough of `tensorrt.ICudaEngine` / `IExecutionContext` for
`cosa.export.tensorrt_engine.Engine`: its "inference" reads the input through the raw address it
was given, as TensorRT does, so a tensor whose memory is not laid out (N, 3, H, W) C-contiguous
gives the wrong answer here too. `FakeCuda` stands in for `torch.cuda.device`, `Stream` and
`stream` and records which device and stream were current at each TensorRT call; buffers live on
the CPU.
"""

from __future__ import annotations

import contextlib
import ctypes
import enum
import types
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pytest


@dataclass
class FakeStream:
    cuda_stream: int
    device: int
    synchronized: int = 0

    def synchronize(self) -> None:
        self.synchronized += 1


@dataclass
class FakeCuda:
    """Current device and stream, as the CUDA runtime would hold them."""

    device: int = 0
    stream: int = 0  # 0: the legacy default stream
    streams: list[FakeStream] = field(default_factory=list)

    def device_context(self, index: int) -> contextlib.AbstractContextManager[None]:
        return self._set("device", int(index))

    def new_stream(self, device: int | None = None) -> FakeStream:
        stream = FakeStream(0x5000 + len(self.streams), self.device if device is None else device)
        self.streams.append(stream)
        return stream

    def stream_context(self, stream: FakeStream) -> contextlib.AbstractContextManager[None]:
        return self._set("stream", stream.cuda_stream)

    @contextlib.contextmanager
    def _set(self, name: str, value: int) -> Iterator[None]:
        before = getattr(self, name)
        setattr(self, name, value)
        try:
            yield
        finally:
            setattr(self, name, before)


def install_fake_cuda(monkeypatch: pytest.MonkeyPatch) -> FakeCuda:
    """CPU tensors stand in for CUDA ones; device and stream changes are recorded."""
    import torch

    from cosa.export import tensorrt_engine

    cuda = FakeCuda()
    monkeypatch.setattr(tensorrt_engine, "cuda_device", lambda index=0, *a: torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "device", cuda.device_context)
    monkeypatch.setattr(torch.cuda, "Stream", cuda.new_stream)
    monkeypatch.setattr(torch.cuda, "stream", cuda.stream_context)
    return cuda


class FakeEngine:
    """An engine whose "mask" is channel 0 of the input read through its raw address."""

    names = ["images", "logits", "mask"]

    def __init__(self, cuda: FakeCuda | None = None) -> None:
        self.cuda = cuda
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addresses: dict[str, int] = {}
        self.loaded_on: int | None = None  # current CUDA device at deserialisation
        self.executed_on: list[tuple[int, int]] = []  # (device, stream argument) per call

    @property
    def num_io_tensors(self) -> int:
        return len(self.names)

    def get_tensor_name(self, i: int) -> str:
        return self.names[i]

    def get_tensor_dtype(self, name: str) -> str:
        return {"images": "f32", "logits": "f32", "mask": "i32"}[name]

    def get_tensor_profile_shape(self, name: str, profile: int) -> list[tuple[int, ...]]:
        return [(1, 3, 16, 16), (1, 3, 64, 64), (4, 3, 128, 128)]

    def create_execution_context(self) -> FakeEngine:
        return self

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        n, _, h, w = shape
        self.shapes = {"images": shape, "logits": (n, 4, h, w), "mask": (n, h, w)}
        return True

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        return self.shapes[name]

    def set_tensor_address(self, name: str, address: int) -> bool:
        self.addresses[name] = address
        return True

    def execute_async_v3(self, stream: int) -> bool:
        self.executed_on.append((self.cuda.device if self.cuda else -1, stream))
        n, c, h, w = self.shapes["images"]
        size = n * c * h * w
        raw = (ctypes.c_float * size).from_address(self.addresses["images"])
        images = np.frombuffer(raw, dtype=np.float32).reshape(n, c, h, w)  # C order, as TensorRT
        mask = np.ascontiguousarray(images[:, 0], dtype=np.int32)
        ctypes.memmove(self.addresses["mask"], mask.ctypes.data, mask.nbytes)
        return True


class Severity(enum.Enum):
    """`tensorrt.ILogger.Severity`."""

    INTERNAL_ERROR = 0
    ERROR = 1
    WARNING = 2
    INFO = 3
    VERBOSE = 4


def fake_tensorrt_module(version: str) -> types.ModuleType:
    """A `tensorrt` module with its version and `ILogger` (and `ILogger.Severity`); the fakes
    add the classes their code under test uses."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version  # type: ignore[attr-defined]

    class ILogger:
        Severity = Severity

        def __init__(self) -> None:
            pass

    trt.ILogger = ILogger  # type: ignore[attr-defined]
    return trt


def fake_tensorrt(engine: FakeEngine | None, version: str = "10.9.0") -> types.ModuleType:
    """A `tensorrt` module whose runtime deserialises to `engine` (None: a foreign plan)."""
    trt = fake_tensorrt_module(version)
    ILogger = trt.ILogger

    class Runtime:
        def __init__(self, logger: ILogger) -> None:
            assert isinstance(logger, ILogger)

        def deserialize_cuda_engine(self, data: bytes) -> FakeEngine | None:
            assert data == b"engine bytes"
            if engine is not None and engine.cuda is not None:
                engine.loaded_on = engine.cuda.device
            return engine

    trt.Runtime = Runtime  # type: ignore[attr-defined]
    trt.nptype = lambda t: {"f32": np.float32, "i32": np.int32}[t]  # type: ignore[attr-defined]
    return trt


class CudaFakeEngine(FakeEngine):
    """`FakeEngine` on a real GPU: reads and writes the CUDA buffers through their raw addresses
    (`__cuda_array_interface__`) on the stream it is given, after ~10 ms of GPU work, so a missing
    synchronisation shows as a wrong mask."""

    def execute_async_v3(self, stream: int) -> bool:
        import torch

        self.executed_on.append((torch.cuda.current_device(), stream))
        images = torch.as_tensor(_Cai(self.addresses["images"], self.shapes["images"], "<f4"))
        mask = torch.as_tensor(_Cai(self.addresses["mask"], self.shapes["mask"], "<i4"))
        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            torch.cuda._sleep(20_000_000)
            mask.copy_(images[:, 0].to(torch.int32))
        return True


class _Cai:
    def __init__(self, address: int, shape: tuple[int, ...], typestr: str) -> None:
        self.__cuda_array_interface__ = {
            "shape": tuple(shape),
            "typestr": typestr,
            "data": (address, False),
            "version": 2,
            "strides": None,
        }
