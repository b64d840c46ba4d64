"""The real Triton server on machines without Docker: install it, find it, run it.

The `nvidia-pytriton` wheel ships a `tritonserver` binary (Triton 2.51, python backend only) and
python-backend stubs for CPython 3.8-3.13. `setup_triton` installs it, plus the small environment
its python-backend models run in, under one home folder per interpreter version:

    HOME/py3.11/
      server/     pip --target of nvidia-pytriton (--no-deps: its dependencies would downgrade
                  numpy in the caller's environment)
      env/        pip --target of numpy<2, onnxruntime, Pillow
      backends/python/  libtriton_python.so + triton_python_backend_utils.py copied, stub symlinked
      install.json      written last: the install is complete

HOME is `$COSA_TRITON_HOME`, else `~/.cache/cosa/triton`. `TritonServer` runs the binary with the
traps of ../shared/DEPLOYMENT.md handled:
- numpy < 2 for python-backend models (with numpy 2 they load READY and return empty outputs). The
  stub embeds CPython in isolated mode, so PYTHONPATH is ignored; its first `sys.path` entry is ''
  (the working directory), so the server runs with `env/` as working directory, which puts that
  environment ahead of the interpreter's own site-packages.
- LD_LIBRARY_PATH = the interpreter's LIBDIR, or the stub loads another libpython.
- the stub is symlinked: a copy loses its rpath to the wheel's bundled libraries and loading hangs.
- own process group (killed as a whole: the stubs are children), free loopback ports, readiness
  polled with a timeout, errors carry the log's tail.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, TextIO

from cosa.errors import MissingDependencyError, ServingError
from cosa.files import staged_folder, write_text_atomic
from cosa.serving.triton_names import ServerPorts

__all__ = [
    "CONTAINER_IMAGE",
    "HOME_ENV_VAR",
    "PYTRITON_VERSION",
    "PYTHON_BACKEND_SHM_MIB",
    "SERVER_ENV_REQUIREMENTS",
    "TritonInstall",
    "TritonServer",
    "default_home",
    "docker_command",
    "find_triton",
    "free_ports",
    "model_configs",
    "model_runtimes",
    "python_env_install",
    "serve",
    "setup_triton",
]

logger = logging.getLogger(__name__)

PYTRITON_VERSION = "0.7.0"  # ships tritonserver 2.51.0
CONTAINER_IMAGE = "nvcr.io/nvidia/tritonserver:24.10-py3"  # NVIDIA's container with Triton 2.51
SERVER_ENV_REQUIREMENTS = ("numpy<2", "onnxruntime", "Pillow")
# /dev/shm of a container running python-backend models: they exchange tensors there, and
# container runtimes default to 64 MiB.
PYTHON_BACKEND_SHM_MIB = 1024
HOME_ENV_VAR = "COSA_TRITON_HOME"
_MARKER = "install.json"
_LOG_TAIL_LINES = 25
# Backends the embedded server has; configs naming others stop at "unable to find backend library".
_EMBEDDED_BACKENDS = ("python",)


@dataclass(frozen=True)
class TritonInstall:
    """A prepared install (see the module docstring for the layout)."""

    root: Path  # HOME/py3.X
    server_dir: Path
    env_dir: Path
    backends_dir: Path

    @property
    def binary(self) -> Path:
        return self.server_dir / "pytriton" / "tritonserver" / "bin" / "tritonserver"

    @classmethod
    def at(cls, root: Path) -> TritonInstall:
        return cls(root, root / "server", root / "env", root / "backends")


def default_home() -> Path:
    """`$COSA_TRITON_HOME`, else `~/.cache/cosa/triton`."""
    env = os.environ.get(HOME_ENV_VAR)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "cosa" / "triton"


def _python_tag() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def find_triton(home: Path | None = None) -> TritonInstall:
    """Returns the install `setup_triton` prepared for this interpreter.

    Raises:
        MissingDependencyError: not set up (or incomplete).
    """
    home = home or default_home()
    install = TritonInstall.at(home / f"py{_python_tag()}")
    required = (
        install.root / _MARKER,
        install.binary,
        install.env_dir / "numpy",
        install.backends_dir / "python" / "triton_python_backend_stub",
    )
    missing = [path for path in required if not path.exists()]
    if missing:
        raise MissingDependencyError(
            f"the Triton server is not set up in {install.root} (missing {missing[0]}); "
            f"run `cosa triton setup` (or `cosa triton setup --dir {home}`)"
        )
    return install


def setup_triton(home: Path | None = None, *, force: bool = False) -> TritonInstall:
    """Installs the embedded Triton server and its python-backend environment (idempotent).

    Uses this interpreter's pip (PyPI or the configured index); nothing is installed into the
    running environment. Each part is installed into a temporary folder and renamed into place.

    Args:
        home: install folder; default `default_home()`.
        force: reinstall even if a complete install exists.

    Returns:
        The install.

    Raises:
        MissingDependencyError: pip is missing or fails, this Python version has no stub, or the
            environment does not import.
    """
    home = home or default_home()
    install = TritonInstall.at(home / f"py{_python_tag()}")
    if not force:
        try:
            return find_triton(home)
        except MissingDependencyError:
            pass
    install.root.mkdir(parents=True, exist_ok=True)
    (install.root / _MARKER).unlink(missing_ok=True)
    _pip_install_into(install.server_dir, ["--no-deps", f"nvidia-pytriton=={PYTRITON_VERSION}"])
    requirements = _server_env_requirements()
    try:
        _pip_install_into(install.env_dir, requirements)
    except MissingDependencyError as exc:
        if requirements == list(SERVER_ENV_REQUIREMENTS):
            raise
        logger.warning("%s; retrying without pinning onnxruntime and Pillow", exc)
        requirements = list(SERVER_ENV_REQUIREMENTS)
        _pip_install_into(install.env_dir, requirements)
    _check_server_env(install.env_dir)
    _prepare_backends(install)
    marker = {
        "nvidia_pytriton": PYTRITON_VERSION,
        "requirements": requirements,
        "python": sys.version.split()[0],
        "libdir": sysconfig.get_config_var("LIBDIR"),
    }
    write_text_atomic(install.root / _MARKER, json.dumps(marker, indent=2) + "\n")
    logger.info("Triton server ready in %s", install.root)
    return install


def _server_env_requirements() -> list[str]:
    """SERVER_ENV_REQUIREMENTS with onnxruntime and Pillow pinned to the client side's versions,
    if installed, so that served and local masks come from the same kernels and the ensemble
    decodes images with the same Pillow (and its bundled codecs) as `cosa segment`."""
    from importlib import metadata

    pinned = []
    for requirement in SERVER_ENV_REQUIREMENTS:
        if requirement in ("onnxruntime", "Pillow"):
            with contextlib.suppress(metadata.PackageNotFoundError):
                requirement = f"{requirement}=={metadata.version(requirement)}"
        pinned.append(requirement)
    return pinned


def _pip_install_into(target: Path, requirements: list[str]) -> None:
    """`pip install --target` into a staged sibling of `target`, then swaps it in atomically (a
    failed install leaves the previous one as it was)."""
    logger.info("installing %s into %s", " ".join(requirements), target)
    with staged_folder(target) as tmp:
        cmd = [
            sys.executable, "-m", "pip", "install", "--no-input", "--disable-pip-version-check",
            # The target is its own environment: conflicts with the caller's packages do not matter.
            "--no-warn-conflicts", "--only-binary=:all:", "--target", str(tmp), *requirements,
        ]  # fmt: skip
        result = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
        if result.returncode != 0:
            tail = " | ".join((result.stdout + result.stderr).strip().splitlines()[-5:])
            if "No module named pip" in result.stderr:
                tail = f"{sys.executable} has no pip; install pip into it first"
            raise MissingDependencyError(
                f"`pip install {' '.join(requirements)}` into {target} failed: {tail}"
            )


def _check_server_env(env_dir: Path) -> None:
    """Imports the environment the way the stub will see it (first on sys.path, isolated)."""
    probe = (
        "import sys; sys.path.insert(0, sys.argv[1]); import numpy, onnxruntime, PIL; "
        "assert int(numpy.__version__.split('.')[0]) < 2, numpy.__version__"
    )
    result = subprocess.run(
        [sys.executable, "-I", "-c", probe, str(env_dir)], capture_output=True, text=True
    )
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["?"])[-1]
        raise MissingDependencyError(
            f"the python-backend environment {env_dir} does not import ({last}); "
            "rerun `cosa triton setup --force`"
        )


def _prepare_backends(install: TritonInstall) -> None:
    """backends/python: the backend library and utils copied, the stub symlinked (keeps rpath)."""
    wheel = install.server_dir / "pytriton" / "tritonserver"
    stub = wheel / "python_backend_stubs" / _python_tag() / "triton_python_backend_stub"
    if not stub.is_file():
        available = sorted(p.name for p in (wheel / "python_backend_stubs").iterdir())
        raise MissingDependencyError(
            f"nvidia-pytriton {PYTRITON_VERSION} has no python-backend stub for Python "
            f"{_python_tag()} (it has {', '.join(available)}); run cosa with one of those"
        )
    with staged_folder(install.backends_dir) as tmp:
        python_dir = tmp / "python"
        python_dir.mkdir()
        for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
            shutil.copy2(wheel / "backends" / "python" / name, python_dir / name)
        (python_dir / "triton_python_backend_stub").symlink_to(stub.resolve())


def free_ports(count: int = 3) -> list[int]:
    """`count` distinct loopback ports that were free a moment ago (the OS picks them)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


class TritonServer:
    """A `tritonserver` process on 127.0.0.1, from the install `setup_triton` prepared.

    Use as a context manager: `with TritonServer(repo) as server: ... server.grpc_url`. The
    server runs in its own process group; `stop()` ends it and its python-backend stubs.
    """

    def __init__(
        self,
        repo: Path,
        *,
        ports: ServerPorts | None = None,
        home: Path | None = None,
        startup_timeout_s: float = 120.0,
        log_path: Path | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        """Prepares (does not start) a server.

        Args:
            repo: model repository folder.
            ports: loopback ports; None picks free ones (and retries if one is taken meanwhile).
            home: install home; default `default_home()`.
            startup_timeout_s: how long `start()` waits for readiness (model loading included).
            log_path: where the server's output goes; default a temporary file, which the
                context manager removes after a clean exit (errors name it; it is kept then).
            extra_args: more `tritonserver` flags, e.g. ("--log-verbose=1",).

        Raises:
            MissingDependencyError: the server is not set up.
            ServingError: `repo` is not a folder.
        """
        if not repo.is_dir():
            raise ServingError(
                f"model repository {repo} is not a folder; build it with `cosa triton repo`"
            )
        self.repo = repo.resolve()
        self.install = find_triton(home)
        self._fixed_ports = ports
        self.ports = ports or ServerPorts(*free_ports(3))
        self.startup_timeout_s = startup_timeout_s
        self._own_log = log_path is None
        if log_path is None:
            fd, name = tempfile.mkstemp(prefix="tritonserver.", suffix=".log")
            os.close(fd)
            log_path = Path(name)
        self.log_path = log_path
        self.extra_args = tuple(extra_args)
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.ports.http}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.ports.grpc}"

    @property
    def metrics_url(self) -> str:
        return f"127.0.0.1:{self.ports.metrics}"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def command(self) -> list[str]:
        """The `tritonserver` command line."""
        return [
            str(self.install.binary),
            f"--model-repository={self.repo}",
            f"--backend-directory={self.install.backends_dir}",
            "--http-address=127.0.0.1", f"--http-port={self.ports.http}",
            "--grpc-address=127.0.0.1", f"--grpc-port={self.ports.grpc}",
            "--metrics-address=127.0.0.1", f"--metrics-port={self.ports.metrics}",
            "--allow-gpu-metrics=false",
            # A model that fails to load stops the server instead of serving the others silently.
            "--exit-on-error=true",
            "--exit-timeout-secs=10",
            *self.extra_args,
        ]  # fmt: skip

    def environment(self) -> dict[str, str]:
        """The server's environment: LD_LIBRARY_PATH = this interpreter's LIBDIR first."""
        env = dict(os.environ)
        libdir = sysconfig.get_config_var("LIBDIR") or ""
        env["LD_LIBRARY_PATH"] = os.pathsep.join(
            p for p in (libdir, os.environ.get("LD_LIBRARY_PATH", "")) if p
        )
        # Ignored by the stub (isolated mode, see the module docstring) but read by stubs built
        # otherwise; the working directory is what puts env/ first.
        env["PYTHONPATH"] = str(self.install.env_dir)
        return env

    def start(self) -> TritonServer:
        """Starts the server and waits until it is ready.

        Raises:
            ServingError: the server exited or did not become ready in time; the message has the
                log's error lines.
        """
        if self._process is not None:
            raise ServingError("this TritonServer is already started")
        attempt = 1
        while True:
            process = self._launch()
            try:
                self._wait_ready(process)
            except KeyboardInterrupt:
                self.stop()  # Ctrl-C during start-up must not leave the server behind
                raise
            except ServingError:
                self.stop()
                taken = "already in use" in self.log_text()
                if self._fixed_ports or not taken or attempt == 3:
                    raise
                # Another process took one of the free ports between choosing and binding.
                self.ports = ServerPorts(*free_ports(3))
                attempt += 1
                continue
            logger.info(
                "Triton ready: HTTP %s, gRPC %s, metrics %s (log %s)",
                self.http_url, self.grpc_url, self.metrics_url, self.log_path,
            )  # fmt: skip
            return self

    def _launch(self) -> subprocess.Popen[bytes]:
        with open(self.log_path, "wb") as log:  # the child keeps its own descriptor
            self._process = subprocess.Popen(
                self.command(),
                cwd=self.install.env_dir,  # puts the numpy<2 environment first (module docstring)
                env=self.environment(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # own process group: the stubs die with the server
            )
        return self._process

    def _wait_ready(self, process: subprocess.Popen[bytes]) -> None:
        url = f"http://{self.http_url}/v2/health/ready"
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            code = process.poll()
            if code is not None:
                raise ServingError(
                    f"tritonserver exited with code {code} while starting on {self.repo}: "
                    f"{self.log_errors()}"
                )
            try:
                with urllib.request.urlopen(url, timeout=1.0) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass  # not listening yet, or not ready (400)
            time.sleep(0.1)
        raise ServingError(
            f"tritonserver did not become ready within {self.startup_timeout_s:.0f} s on "
            f"{self.repo}: {self.log_errors()}"
        )

    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def wait(self, timeout_s: float | None = None) -> int | None:
        """Waits for the server to exit; returns its exit code (None on timeout)."""
        if self._process is None:
            return None
        try:
            return self._process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, timeout_s: float = 15.0) -> int | None:
        """SIGTERM to the process group, SIGKILL after `timeout_s`; returns the exit code."""
        process, self._process = self._process, None
        if process is None:
            return None
        if process.poll() is None:
            _signal_group(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                logger.warning("tritonserver did not stop in %.0f s; killing it", timeout_s)
                _signal_group(process.pid, signal.SIGKILL)
                process.wait()
        # Stubs left behind by a server that died must not outlive it.
        _signal_group(process.pid, signal.SIGKILL)
        return process.returncode

    def log_text(self) -> str:
        """The server's output so far."""
        try:
            return self.log_path.read_bytes().decode("utf-8", errors="replace")
        except OSError:
            return ""

    def log_errors(self, lines: int = _LOG_TAIL_LINES) -> str:
        """The log's error lines (or its tail if it has none), joined with ' | '."""
        text = [line.strip() for line in self.log_text().splitlines() if line.strip()]
        # Triton's error lines start with "E<date>"; "CudaDriverHelper" is noise on CPU machines.
        markers = ("E", "error", "[libprotobuf ERROR")
        errors = [line for line in text if line.startswith(markers) and "CudaDriver" not in line]
        chosen = (errors or text)[-lines:]
        return (" | ".join(chosen) or "no output") + f" (full log: {self.log_path})"

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
        if exc_type is None:
            self.remove_log()

    def remove_log(self) -> None:
        """Deletes the log file if this object chose it (a caller's `log_path` is kept)."""
        if self._own_log:
            self.log_path.unlink(missing_ok=True)


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):  # the group is gone already
        os.killpg(pgid, sig)


def serve(
    repo: Path,
    ports: ServerPorts = ServerPorts(),
    home: Path | None = None,
    *,
    log_stream: TextIO | None = None,
    startup_timeout_s: float = 120.0,
) -> int:
    """Runs the embedded Triton server in the foreground until Ctrl-C or SIGTERM.

    Args:
        repo: model repository (python-backend models only: the embedded server has no other).
        ports: loopback ports.
        home: install home; default `default_home()`.
        log_stream: where the server's log is copied as it arrives (e.g. sys.stderr); None keeps
            it in the log file only.
        startup_timeout_s: readiness timeout.

    Returns:
        0 when stopped by Ctrl-C/SIGTERM.

    Raises:
        MissingDependencyError: the server is not set up (`cosa triton setup`).
        ServingError: the repository needs a backend the embedded server lacks, or the server
            failed to start or exited on its own.
    """
    _check_embedded_backends(repo)
    server = TritonServer(
        repo,
        ports=ports,
        home=home,
        startup_timeout_s=startup_timeout_s,
    )
    # Signal handlers can only be set from the main thread; elsewhere SIGTERM keeps its default.
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _interrupt) if in_main else None
    offset = 0
    interrupted = False
    try:
        server.start()
        while True:
            code = server.wait(0.5)
            offset = _copy_log(server.log_path, offset, log_stream)
            if code is not None:
                raise ServingError(f"tritonserver exited with code {code}: {server.log_errors()}")
    except KeyboardInterrupt:
        logger.info("stopping Triton")
        interrupted = True
        return 0
    finally:
        server.stop()
        _copy_log(server.log_path, offset, log_stream)
        if interrupted:
            server.remove_log()  # a clean stop; on errors the log is kept and named
        if in_main:
            signal.signal(signal.SIGTERM, previous)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    # SIGTERM takes the same clean path as Ctrl-C.
    raise KeyboardInterrupt


def _copy_log(path: Path, offset: int, stream: TextIO | None) -> int:
    """Copies what `path` gained since `offset` to `stream`; returns the new offset."""
    if stream is None:
        return offset
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            data = fh.read()
    except OSError:
        return offset
    if data:
        stream.write(data.decode("utf-8", errors="replace"))
        stream.flush()
    return offset + len(data)


def model_configs(repo: Path) -> dict[str, Any]:
    """Model name -> its parsed config.pbtxt (`tritonclient.grpc.model_config_pb2.ModelConfig`).

    Raises:
        ServingError: a config.pbtxt that Triton's schema rejects.
    """
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    configs = {}
    for config_path in sorted(repo.glob("*/config.pbtxt")):
        config = model_config_pb2.ModelConfig()
        try:
            text_format.Parse(config_path.read_text(), config)
        except (OSError, text_format.ParseError) as exc:
            raise ServingError(f"{config_path} is not a valid model config: {exc}") from exc
        configs[config.name or config_path.parent.name] = config
    return configs


def model_runtimes(repo: Path) -> dict[str, str]:
    """Model name -> backend ("python", "onnxruntime", "tensorrt", "ensemble", ...) per config.

    Raises:
        ServingError: a config.pbtxt that Triton's schema rejects.
    """
    platforms = {"onnxruntime_onnx": "onnxruntime", "tensorrt_plan": "tensorrt"}
    return {
        name: config.backend or platforms.get(config.platform, config.platform)
        for name, config in model_configs(repo).items()
    }


def _check_embedded_backends(repo: Path) -> None:
    """Fails before starting when a model needs a backend the embedded server lacks."""
    runtimes = model_runtimes(repo)
    if not runtimes:
        raise ServingError(
            f"{repo} holds no model (no */config.pbtxt); build one with `cosa triton repo`"
        )
    foreign = {m: r for m, r in runtimes.items() if r not in (*_EMBEDDED_BACKENDS, "ensemble")}
    if foreign:
        name, runtime = next(iter(foreign.items()))
        raise ServingError(
            f"model {name!r} in {repo} needs the {runtime} backend, but the embedded Triton has "
            "the python backend only: rebuild with `cosa triton repo ARTIFACT_DIR --platform "
            f"python`, or run NVIDIA's container: {docker_command(repo)}"
        )


def docker_command(
    repo: Path, ports: ServerPorts = ServerPorts(), *, gpus: bool | None = None
) -> str:
    """The `docker run` line that serves `repo` with NVIDIA's Triton container.

    Args:
        repo: model repository (mounted read-only at /models).
        ports: host ports for HTTP, gRPC and metrics.
        gpus: pass `--gpus all`; default: when a model needs the onnxruntime or tensorrt backend.

    Python-backend models get their packages installed at start (the container has neither
    onnxruntime nor Pillow) and a larger /dev/shm (the python backend exchanges tensors there).
    """
    import shlex

    try:
        runtimes = set(model_runtimes(repo).values())
    except ServingError:
        runtimes = set()
    if gpus is None:
        gpus = bool(runtimes & {"onnxruntime", "tensorrt"})
    server = "tritonserver --model-repository=/models"
    parts = ["docker", "run", "--rm"]
    if gpus:
        parts += ["--gpus", "all"]
    if "python" in runtimes:
        parts.append(f"--shm-size={PYTHON_BACKEND_SHM_MIB}m")
    inside = ServerPorts()  # the container's server listens on Triton's defaults
    for host, container in zip(ports, inside, strict=True):
        parts += ["-p", f"{host}:{container}"]
    parts += ["-v", f"{Path(repo).resolve()}:/models:ro", CONTAINER_IMAGE]
    if "python" in runtimes:
        parts += ["bash", "-c", f"{python_env_install()} && exec {server}"]
    else:
        parts += server.split()
    return shlex.join(parts)


def python_env_install() -> str:
    """The shell command that installs what python-backend models need into NVIDIA's Triton
    container, which has neither onnxruntime nor Pillow (`SERVER_ENV_REQUIREMENTS`)."""
    import shlex

    # Double quotes keep the line readable inside a single-quoted `bash -c` script.
    requirements = " ".join(r if shlex.quote(r) == r else f'"{r}"' for r in SERVER_ENV_REQUIREMENTS)
    return f"pip install --quiet {requirements}"
