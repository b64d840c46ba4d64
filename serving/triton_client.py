"""Segmentation client for a Triton server (tritonclient, gRPC or HTTP).

The constructor checks, once, that the server is reachable and that the model is ready and has the
deploy graph's names, dtypes and dims (from spec.json when given): mistakes surface as one
`ServingError` line before any image is sent. Then:

- `infer(images)`: float32 (N, 3, H, W) -> {"mask": int32 (N, H, W)[, "logits": ...]}.
- `infer_many(batches, max_in_flight)`: asynchronous requests, at most `max_in_flight` at a time,
  results in submission order.
- `stream(frames, max_in_flight)`: gRPC bidirectional streaming for video, results in frame order.
- `infer_encoded(files' bytes)`: the repository's ensemble: bytes in, palette PNG bytes out.

Triton batches concurrent requests only when their shapes match; `bucket_by_size` groups images of
equal (H, W) so that the dynamic batcher (and each request) can batch them. Transient failures
(gRPC UNAVAILABLE/RESOURCE_EXHAUSTED/ABORTED, HTTP 429/502/503/504, dropped connections) are
retried with exponential backoff; invalid requests are not.
"""

from __future__ import annotations

import logging
import queue
import re
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from cosa.choices import WireProtocol
from cosa.errors import InputError, ServingError
from cosa.export.spec import (
    INPUT_NAME,
    LOGITS_NAME,
    MASK_NAME,
    ModelSpec,
    deploy_inputs,
    deploy_outputs,
)
from cosa.images import ImageReadError
from cosa.serving.runner import ClosingRunner, check_images
from cosa.serving.triton_names import (
    DEFAULT_MODEL_NAME,
    ENSEMBLE_INPUT_NAME,
    PNG_OUTPUT_NAME,
    ensemble_model_name,
    triton_dtype,
)

__all__ = [
    "TritonSegmentationClient",
    "bucket_by_size",
    "is_transient",
    "with_retries",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")

_TRANSIENT_GRPC = ("StatusCode.UNAVAILABLE", "StatusCode.RESOURCE_EXHAUSTED", "StatusCode.ABORTED")
_TRANSIENT_HTTP = ("429", "502", "503", "504")
# The ensemble's pre-processing model's error for an undecodable image (preprocess_model.py).
_UNDECODABLE = re.compile(r"cannot decode image (?P<index>\d+) of the request: (?P<reason>.+)$")


@dataclass(frozen=True)
class _TensorMeta:
    datatype: str  # Triton name: FP32, INT32, ...
    shape: tuple[int, ...]  # batch dim included; -1 = variable


def bucket_by_size(
    items: Iterable[tuple[T, np.ndarray]], batch_size: int, max_pending: int | None = None
) -> Iterator[tuple[list[T], np.ndarray]]:
    """Groups images of equal (H, W) into batches, so that Triton can batch them.

    Args:
        items: (key, image float32 (3, H, W)) pairs; the key (an index, a path) travels along.
        batch_size: images per batch, >= 1 (usually the model's max batch).
        max_pending: most images held back waiting for a full bucket; when exceeded, the fullest
            bucket is sent as is, which bounds memory. Default 4 * batch_size.

    Yields:
        (keys, images float32 (n, 3, H, W)) with 1 <= n <= batch_size, full buckets as soon as
        they fill, the rest at the end (oldest bucket first). Order across sizes is not kept.

    Raises:
        InputError: an image is not (3, H, W).
    """
    if batch_size < 1:
        raise InputError(f"batch size {batch_size} must be >= 1")
    limit = max_pending if max_pending is not None else 4 * batch_size
    buckets: OrderedDict[tuple[int, int], list[tuple[T, np.ndarray]]] = OrderedDict()
    pending = 0
    for key, image in items:
        if image.ndim != 3 or image.shape[0] != 3:
            raise InputError(f"image {key!r} has shape {image.shape}; expected (3, H, W)")
        bucket = buckets.setdefault((image.shape[1], image.shape[2]), [])
        bucket.append((key, image))
        pending += 1
        if len(bucket) == batch_size:
            yield _stack(buckets.pop((image.shape[1], image.shape[2])))
            pending -= batch_size
        elif pending > limit:
            fullest = max(buckets, key=lambda size: len(buckets[size]))
            flushed = buckets.pop(fullest)
            pending -= len(flushed)
            yield _stack(flushed)
    for bucket in buckets.values():
        yield _stack(bucket)


def with_retries(
    attempt: Callable[[], T],
    *,
    retries: int,
    backoff_s: float,
    first_error: Exception | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Calls `attempt`, retrying transient failures with exponential backoff.

    Transient: gRPC UNAVAILABLE, RESOURCE_EXHAUSTED, ABORTED; HTTP 429, 502, 503, 504; dropped or
    refused connections. Anything else (invalid argument, unknown model, a model's own error) is
    raised at once.

    Args:
        attempt: the request.
        retries: retries after the first try, >= 0.
        backoff_s: delay before the first retry; doubles with each retry.
        first_error: a failure already seen (e.g. of an asynchronous request); it counts as the
            first try.
        sleep: the delay function (tests pass a recorder).

    Returns:
        What `attempt` returns.

    Raises:
        Exception: the last failure, when it is not transient or the retries are used up.
    """
    error = first_error
    tries = 0 if first_error is None else 1
    while True:
        if error is not None:
            if not is_transient(error) or tries > retries:
                raise error
            delay = backoff_s * 2 ** (tries - 1)
            logger.warning("transient Triton error (%s); retry in %.2f s", _describe(error), delay)
            sleep(delay)
        tries += 1
        try:
            return attempt()
        except Exception as exc:  # classified at the top of the loop
            error = exc


def _stack(bucket: list[tuple[T, np.ndarray]]) -> tuple[list[T], np.ndarray]:
    return [key for key, _ in bucket], np.stack([image for _, image in bucket])


class TritonSegmentationClient(ClosingRunner):
    """Client of the segmentation model of a repository written by `cosa triton repo`."""

    def __init__(
        self,
        url: str,
        protocol: WireProtocol | str = WireProtocol.GRPC,
        model_name: str = DEFAULT_MODEL_NAME,
        spec: ModelSpec | None = None,
        timeout_s: float = 60.0,
        *,
        retries: int = 3,
        backoff_s: float = 0.2,
        connect_timeout_s: float = 5.0,
        http_concurrency: int = 8,
    ) -> None:
        """Connects and checks the server, the model and its metadata.

        Args:
            url: "host:port" (an "http://" or "grpc://" prefix is accepted); gRPC is usually port
                8001, HTTP 8000.
            protocol: "grpc" (needed for `stream`) or "http".
            model_name: the segmentation model (the ensemble is `<model_name>_ensemble`).
            spec: the export's spec; its names, dtypes and class count must match the server's
                model. None checks the deploy-graph contract with any class count.
            timeout_s: per-request timeout, seconds.
            retries: retries of a request after a transient failure.
            backoff_s: first retry delay; doubles each retry.
            connect_timeout_s: timeout of the initial reachability check.
            http_concurrency: HTTP connections for asynchronous requests.

        Raises:
            ServingError: server unreachable or not ready, model missing or not ready, or model
                metadata that disagrees with the spec.
        """
        if protocol not in set(WireProtocol):
            raise ServingError(f"unknown protocol {protocol!r}; choose grpc or http")
        protocol = WireProtocol(protocol)
        self.url = url.split("://", 1)[-1].rstrip("/")
        self.protocol = protocol
        self.model_name = model_name
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self._ensemble_checked = False
        if protocol == "grpc":
            import tritonclient.grpc as module
        else:
            import tritonclient.http as module
        self._module: Any = module
        if protocol == "grpc":
            self._client: Any = module.InferenceServerClient(self.url)
        else:
            self._client = module.InferenceServerClient(
                self.url,
                concurrency=http_concurrency,
                connection_timeout=connect_timeout_s,
                network_timeout=timeout_s,
            )
        from tritonclient.utils import InferenceServerException

        try:
            self._check_server(connect_timeout_s)
            self._check_model(model_name)
            config = self._call(self._client.get_model_config, model_name)
            self.max_batch = int(config.get("config", config).get("max_batch_size", 0))
            self.num_classes = self._check_metadata(spec)
        except (InferenceServerException, OSError) as exc:  # e.g. the server went away meanwhile
            self._client.close()
            raise ServingError(f"Triton at {self.url}: {_describe(exc)}") from exc
        except BaseException:
            self._client.close()
            raise
        self.spec = spec

    # -- checks ---------------------------------------------------------------------------

    def _call(self, method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Calls a tritonclient metadata method; gRPC results as JSON dicts like HTTP's."""
        if self.protocol == "grpc":
            kwargs.setdefault("as_json", True)
            kwargs.setdefault("client_timeout", self.timeout_s)
        return method(*args, **kwargs)

    def _unreachable(self, reason: str) -> ServingError:
        return ServingError(
            f"cannot reach Triton at {self.url} ({self.protocol}: {reason}): is it running? start "
            "it with `cosa triton serve REPO` (gRPC is usually port 8001, HTTP 8000)"
        )

    def _check_server(self, connect_timeout_s: float) -> None:
        from tritonclient.utils import InferenceServerException

        try:
            if self.protocol == "grpc":
                live = self._client.is_server_live(client_timeout=connect_timeout_s)
            else:
                live = self._client.is_server_live()
        except InferenceServerException as exc:
            raise self._unreachable(_first_line(exc.message() or str(exc))) from None
        except OSError as exc:  # HTTP: refused, reset, DNS
            raise self._unreachable(_first_line(str(exc))) from None
        if not live:
            raise self._unreachable("server not live")

    def _check_model(self, model_name: str) -> None:
        if self._client.is_model_ready(model_name):
            return
        index = self._call(self._client.get_model_repository_index)
        models = index.get("models", []) if isinstance(index, dict) else index
        states = {m["name"]: (m.get("state", "?"), m.get("reason", "")) for m in models}
        if model_name not in states:
            raise ServingError(
                f"Triton at {self.url} has no model {model_name!r} (it has: "
                f"{', '.join(sorted(states)) or 'none'}); pass one of those names or build the "
                "repository with `cosa triton repo`"
            )
        state, reason = states[model_name]
        raise ServingError(
            f"model {model_name!r} on Triton at {self.url} is not ready (state {state}"
            f"{': ' + reason if reason else ''}); see the server log"
        )

    def _check_metadata(self, spec: ModelSpec | None) -> int:
        """Compares the server's tensors with the spec; returns the class count K."""
        metadata = self._call(self._client.get_model_metadata, self.model_name)
        inputs = _tensor_metas(metadata.get("inputs", []))
        outputs = _tensor_metas(metadata.get("outputs", []))
        logits = outputs.get(LOGITS_NAME)
        k_server = logits.shape[1] if logits is not None and len(logits.shape) == 4 else -1
        if spec is not None:
            k = spec.num_classes
            expected = [("input", t) for t in spec.inputs] + [("output", t) for t in spec.outputs]
        else:  # the deploy-graph contract, any class count
            k = k_server
            expected = [("input", t) for t in deploy_inputs()]
            expected += [("output", t) for t in deploy_outputs(k)]
        problems = []
        for kind, tensor in expected:
            want = _TensorMeta(triton_dtype(tensor.dtype), tensor.shape)
            problems += _compare(kind, tensor.name, want, inputs if kind == "input" else outputs)
        if problems:
            source = "spec.json" if spec is not None else "the CoSA deploy graph"
            raise ServingError(
                f"model {self.model_name!r} on Triton at {self.url} does not match {source}: "
                f"{'; '.join(problems)}; rebuild the repository from this export with "
                "`cosa triton repo ARTIFACT_DIR` or pass the export that built it"
            )
        return k

    # -- requests ---------------------------------------------------------------------------

    def _inputs(self, images: np.ndarray) -> list[Any]:
        tensor = self._module.InferInput(INPUT_NAME, list(images.shape), "FP32")
        tensor.set_data_from_numpy(images)
        return [tensor]

    def _outputs(self, logits: bool) -> list[Any]:
        names = [MASK_NAME, LOGITS_NAME] if logits else [MASK_NAME]
        return [self._module.InferRequestedOutput(name) for name in names]

    def _parse(self, result: Any, logits: bool) -> dict[str, np.ndarray]:
        parsed = {MASK_NAME: result.as_numpy(MASK_NAME)}
        if logits:
            parsed[LOGITS_NAME] = result.as_numpy(LOGITS_NAME)
        return parsed

    def _infer_once(self, model: str, inputs: list[Any], outputs: list[Any]) -> Any:
        if self.protocol == "grpc":
            return self._client.infer(model, inputs, outputs=outputs, client_timeout=self.timeout_s)
        return self._client.infer(model, inputs, outputs=outputs)

    def _with_retries(
        self, attempt: Callable[[], Any], first_error: Exception | None = None
    ) -> Any:
        try:
            return with_retries(
                attempt, retries=self.retries, backoff_s=self.backoff_s, first_error=first_error
            )
        except Exception as exc:
            raise ServingError(f"Triton request to {self.url} failed: {_describe(exc)}") from exc

    def _chunks(self, images: np.ndarray) -> list[np.ndarray]:
        check_images(images)
        step = self.max_batch if self.max_batch > 0 else len(images)
        return [images[i : i + step] for i in range(0, len(images), step)]

    def infer(self, images: np.ndarray, *, logits: bool = False) -> dict[str, np.ndarray]:
        """Segments one batch (split into requests of at most the model's max batch).

        Args:
            images: float32 (N, 3, H, W), raw RGB 0-255.
            logits: also return the logits.

        Returns:
            {"mask": int32 (N, H, W)} plus {"logits": float32 (N, K, H, W)} if asked.

        Raises:
            InputError: wrong dtype or shape.
            ServingError: the request failed (after retries for transient errors).
        """
        outputs = self._outputs(logits)
        parts = [
            self._parse(self._request(chunk, outputs), logits) for chunk in self._chunks(images)
        ]
        return _concat(parts)

    def _request(
        self, chunk: np.ndarray, outputs: list[Any], first_error: Exception | None = None
    ) -> Any:
        """One synchronous request, with retries."""
        return self._with_retries(
            lambda: self._infer_once(self.model_name, self._inputs(chunk), outputs), first_error
        )

    def infer_many(
        self, batches: Iterable[np.ndarray], max_in_flight: int = 8, *, logits: bool = False
    ) -> Iterator[dict[str, np.ndarray]]:
        """Segments batches with asynchronous requests, at most `max_in_flight` outstanding.

        Concurrent requests of equal (H, W) are what Triton's dynamic batcher merges: feed
        batches from `bucket_by_size`. Memory stays bounded: batches are pulled from the iterable
        only as the window has room.

        Args:
            batches: float32 (N, 3, H, W) arrays (each split by the model's max batch if needed).
            max_in_flight: most requests outstanding, >= 1.
            logits: also return the logits.

        Yields:
            One result per batch, in submission order (as `infer`).

        Raises:
            InputError: a batch with the wrong dtype or shape.
            ServingError: a request failed (after retries for transient errors).
        """
        if max_in_flight < 1:
            raise InputError(f"max_in_flight {max_in_flight} must be >= 1")
        outputs = self._outputs(logits)
        window: deque[list[tuple[np.ndarray, Callable[[], Any]]]] = deque()
        in_flight = 0
        iterator = iter(batches)
        exhausted = False
        while True:
            while not exhausted and in_flight < max_in_flight:
                batch = next(iterator, None)
                if batch is None:
                    exhausted = True
                    break
                requests = [(chunk, self._submit(chunk, outputs)) for chunk in self._chunks(batch)]
                window.append(requests)
                in_flight += len(requests)
            if not window:
                return
            requests = window.popleft()
            in_flight -= len(requests)
            yield _concat(
                [
                    self._parse(self._collect(chunk, wait, outputs), logits)
                    for chunk, wait in requests
                ]
            )

    def _submit(self, chunk: np.ndarray, outputs: list[Any]) -> Callable[[], Any]:
        """Sends one asynchronous request; returns a function that waits for its result."""
        inputs = self._inputs(chunk)
        if self.protocol == "http":
            pending = self._client.async_infer(self.model_name, inputs, outputs=outputs)
            return pending.get_result  # type: ignore[no-any-return]
        done = threading.Event()
        box: list[Any] = [None, None]

        def callback(result: Any, error: Exception | None) -> None:
            box[0], box[1] = result, error
            done.set()

        self._client.async_infer(
            self.model_name, inputs, callback, outputs=outputs, client_timeout=self.timeout_s
        )

        def wait() -> Any:
            if not done.wait(self.timeout_s + 5.0):
                raise ServingError(f"no answer from Triton at {self.url} in {self.timeout_s} s")
            if box[1] is not None:
                raise box[1]
            return box[0]

        return wait

    def _collect(self, chunk: np.ndarray, wait: Callable[[], Any], outputs: list[Any]) -> Any:
        """An asynchronous result; a transient failure is retried synchronously (order kept)."""
        try:
            return wait()
        except ServingError:
            raise
        except Exception as exc:
            return self._request(chunk, outputs, first_error=exc)

    def stream(
        self, frames: Iterable[np.ndarray], max_in_flight: int = 4, *, logits: bool = False
    ) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        """Segments frames over one gRPC bidirectional stream, with backpressure.

        Args:
            frames: float32 (3, H, W) or (1, 3, H, W) frames, raw RGB 0-255.
            max_in_flight: most frames sent and not yet answered, >= 1; the iterable is read
                only as answers come back.
            logits: also return the logits.

        Yields:
            (frame index, {"mask": int32 (1, H, W)[, "logits": ...]}) in frame order.

        Raises:
            InputError: a frame with the wrong dtype or shape.
            ServingError: HTTP protocol, a failed request (streams are not retried), or no answer
                within the timeout.
        """
        if self.protocol != "grpc":
            raise ServingError(
                "streaming needs the gRPC protocol; create the client with protocol='grpc'"
            )
        if max_in_flight < 1:
            raise InputError(f"max_in_flight {max_in_flight} must be >= 1")
        answers: queue.Queue[tuple[Any, Exception | None]] = queue.Queue()
        from tritonclient.utils import InferenceServerException

        try:
            self._client.start_stream(callback=lambda result, error: answers.put((result, error)))
        except InferenceServerException as exc:  # e.g. another stream of this client is open
            raise ServingError(
                f"cannot open a stream to {self.url}: {_describe(exc)}; a client streams one "
                "sequence at a time: finish or close the previous stream() first"
            ) from exc
        outputs = self._outputs(logits)
        finished = False
        try:
            ready: dict[int, dict[str, np.ndarray]] = {}
            sent = received = next_index = 0
            iterator = iter(frames)
            exhausted = False
            while True:
                while not exhausted and sent - received < max_in_flight:
                    frame = next(iterator, None)
                    if frame is None:
                        exhausted = True
                        break
                    batch = frame[None] if frame.ndim == 3 else frame
                    check_images(batch, one=True)
                    self._client.async_stream_infer(
                        self.model_name, self._inputs(batch), outputs=outputs, request_id=str(sent)
                    )
                    sent += 1
                if received == sent:
                    finished = True
                    return
                try:
                    result, error = answers.get(timeout=self.timeout_s)
                except queue.Empty:
                    raise ServingError(
                        f"no stream answer from Triton at {self.url} in {self.timeout_s} s "
                        f"({sent - received} frames outstanding)"
                    ) from None
                received += 1
                if error is not None:
                    raise ServingError(f"stream request to {self.url} failed: {_describe(error)}")
                ready[int(result.get_response().id)] = self._parse(result, logits)
                while next_index in ready:
                    yield next_index, ready.pop(next_index)
                    next_index += 1
        finally:
            # Cancel what is still outstanding when the consumer stops early or on error.
            self._client.stop_stream(cancel_requests=not finished)

    def infer_encoded(
        self, images: Sequence[bytes], *, ids: bool = False, names: Sequence[str] | None = None
    ) -> dict[str, Any]:
        """Segments encoded images (JPEG/PNG/... file bytes) with the repository's ensemble.

        The server decodes them with the library's decoder (`cosa.images`' policy) and encodes
        the masks as palette PNGs. All images of one call must have the same displayed size;
        send one per call otherwise.

        Args:
            images: encoded image files, 1 <= len <= max batch.
            ids: also return the raw class ids.
            names: the files' names, one per image, for errors.

        Returns:
            {"mask_png": list of PNG bytes} plus {"mask": int32 (N, H, W)} if asked.

        Raises:
            InputError: no images or more than the max batch; with `names`, an image the server
                cannot decode (`ImageReadError` naming the file and the reason, as `load_image`
                does).
            ServingError: no ensemble on the server, or the request failed (without `names`, an
                undecodable image too: the server's message names its index and the reason).
        """
        if names is not None and len(names) != len(images):
            raise InputError(f"got {len(names)} names for {len(images)} images")
        if not 1 <= len(images) <= max(self.max_batch, 1):
            raise InputError(
                f"send 1 to {max(self.max_batch, 1)} images per call, got {len(images)}"
            )
        ensemble = ensemble_model_name(self.model_name)
        if not self._ensemble_checked:
            self._check_model(ensemble)
            self._ensemble_checked = True
        tensor = self._module.InferInput(ENSEMBLE_INPUT_NAME, [len(images), 1], "BYTES")
        tensor.set_data_from_numpy(np.array([[bytes(b)] for b in images], dtype=np.object_))
        requested = [PNG_OUTPUT_NAME, MASK_NAME] if ids else [PNG_OUTPUT_NAME]
        outputs = [self._module.InferRequestedOutput(name) for name in requested]
        try:
            result = self._with_retries(lambda: self._infer_once(ensemble, [tensor], outputs))
        except ServingError as exc:
            undecodable = _UNDECODABLE.search(str(exc))
            if names is None or undecodable is None:
                raise
            index, reason = int(undecodable["index"]), undecodable["reason"]
            raise ImageReadError(names[index], reason) from exc
        parsed: dict[str, Any] = {
            PNG_OUTPUT_NAME: [bytes(item) for item in result.as_numpy(PNG_OUTPUT_NAME).reshape(-1)]
        }
        if ids:
            parsed[MASK_NAME] = result.as_numpy(MASK_NAME)
        return parsed

    def close(self) -> None:
        """Closes the connection."""
        self._client.close()


def _concat(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    if len(parts) == 1:
        return parts[0]
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}


def _tensor_metas(entries: list[dict[str, Any]]) -> dict[str, _TensorMeta]:
    # gRPC's JSON renders int64 dims as strings.
    return {
        e["name"]: _TensorMeta(e["datatype"], tuple(int(d) for d in e.get("shape", ())))
        for e in entries
    }


def _compare(kind: str, name: str, want: _TensorMeta, got: dict[str, _TensorMeta]) -> list[str]:
    if name not in got:
        return [f"{kind} {name!r} missing (server has {', '.join(sorted(got)) or 'none'})"]
    have = got[name]
    if have.datatype != want.datatype or len(have.shape) != len(want.shape):
        have_text, want_text = (
            f"{have.datatype} {list(have.shape)}",
            f"{want.datatype} {list(want.shape)}",
        )
        return [f"{kind} {name!r} is {have_text}, expected {want_text}"]
    fixed_mismatch = any(w != -1 and h != w for h, w in zip(have.shape, want.shape, strict=True))
    if fixed_mismatch:
        return [f"{kind} {name!r} has dims {list(have.shape)}, expected {list(want.shape)}"]
    return []


def is_transient(error: BaseException) -> bool:
    """Whether a tritonclient failure is worth retrying (see `with_retries`)."""
    from tritonclient.utils import InferenceServerException

    if isinstance(error, InferenceServerException):
        status = str(error.status())
        return status in _TRANSIENT_GRPC or status in _TRANSIENT_HTTP
    return isinstance(error, (ConnectionError, TimeoutError))


def _describe(error: BaseException) -> str:
    from tritonclient.utils import InferenceServerException

    if isinstance(error, InferenceServerException):
        status = error.status()
        text = _first_line(error.message() or str(error))
        return f"{status}: {text}" if status else text
    return _first_line(f"{type(error).__name__}: {error}")


def _first_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[0] if lines else ""
