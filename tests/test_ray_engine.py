"""`cosa segment --engine ray`: a real local Ray against the local engine, byte for byte.

Ray advertises the machine's network address even when told to use loopback, so every Ray run here
happens in a network namespace whose only interface is `lo` (`ip netns`, as root), where Ray uses
127.0.0.1; such runs are subprocesses (`ip netns exec NS python ...`). They are skipped where Ray
(`pip install -e ".[ray]"`), root or `ip` is missing. Each starts a Ray (~10 s on 2 cores), hence
the `slow` mark.

The model is the tiny deploy graph of test_triton_repo (1x1 conv + argmax, dynamic N, H, W) run by
onnxruntime: the engine is under test here, not the network.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_triton_repo import make_artifact
from typer.testing import CliRunner

from cli import app
from cosa.serving.ray_engine import INSTALL_HINT

IMAGES = 12
SIZES = ((40, 60), (48, 48), (33, 71))  # (H, W): three size groups


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(images folder, model folder, masks of the local engine) for the whole module."""
    root = tmp_path_factory.mktemp("ray_data")
    images = root / "images"
    (images / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(IMAGES):
        h, w = SIZES[i % len(SIZES)]
        folder = images / "sub" if i % 2 else images
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    (images / "broken.jpg").write_bytes(b"not a jpeg")
    model = make_artifact(root / "model")
    local = root / "local"
    result = CliRunner().invoke(
        app, ["segment", str(images), "--out", str(local), "--model", str(model), "--json"]
    )
    assert result.exit_code == 1, result.output  # the broken file
    return images, model, local


def files(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (hidden temporaries included) -> its bytes."""
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()
    }


@pytest.fixture(scope="module")
def netns() -> Iterator[str]:
    """A network namespace with only loopback up; Ray runs inside it."""
    if importlib.util.find_spec("ray") is None:
        pytest.skip(f"Ray is not installed ({INSTALL_HINT})")
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("a loopback-only network namespace needs root and `ip`")
    name = f"cosa-ray-test-{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot create a network namespace: {made.stderr.strip()}")
    try:
        subprocess.run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False)


def in_netns(netns: str, args: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["ip", "netns", "exec", netns, sys.executable, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.slow
def test_ray_writes_the_local_engines_masks_and_reports_the_bad_file(
    netns: str, data: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    images, model, local = data
    out = tmp_path / "ray"
    args = ["-m", "cosa.app.cli", "segment", str(images), "--out", str(out), "--model", str(model)]
    first = in_netns(netns, [*args, "--engine", "ray", "--ray-workers", "2", "--json"])
    assert first.returncode == 1, first.stderr[-3000:]
    summary = json.loads(first.stdout)
    assert summary["processed"] == IMAGES and summary["skipped"] == 0
    assert [f["path"] for f in summary["failed"]] == [str(images / "broken.jpg")]
    assert "not an image" in summary["failed"][0]["error"]
    assert files(out) == files(local)  # same names, same bytes, no temporaries

    # --skip-existing: only the removed masks are written again, and identically.
    removed = sorted(out.rglob("*.png"))[:4]
    for path in removed:
        path.unlink()
    second = in_netns(netns, [*args, "--engine", "ray", "--skip-existing", "--json"])
    assert second.returncode == 1, second.stderr[-3000:]
    resumed = json.loads(second.stdout)
    assert (resumed["processed"], resumed["skipped"]) == (4, IMAGES - 4)
    assert files(out) == files(local)


KILLING_RUN = textwrap.dedent(
    """
    import json, os, signal, sys
    from pathlib import Path

    from cosa.serving.ray_engine import RayOptions, runner_factory, segment_with_ray

    images, model, out, marker = sys.argv[1:5]
    open_runner = runner_factory(Path(model), backend="onnxruntime")


    class DiesOnce:
        # The first worker to reach its second call SIGKILLs its own process, mid-run.
        def __init__(self):
            self.inner, self.calls = open_runner(), 0
            self.spec = self.inner.spec

        def infer(self, batch):
            self.calls += 1
            if self.calls == 2:
                try:
                    fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                except FileExistsError:
                    pass
                else:
                    os.write(fd, str(os.getpid()).encode())
                    os.close(fd)
                    os.kill(os.getpid(), signal.SIGKILL)
            return self.inner.infer(batch)

        def close(self):
            self.inner.close()


    summary = segment_with_ray(
        [images], Path(out), DiesOnce, batch_size=1, options=RayOptions(workers=2, chunk=2)
    )
    print(json.dumps({"driver": os.getpid(), **summary.to_json()}))
    """
)


@pytest.mark.slow
def test_a_worker_killed_mid_run_loses_and_duplicates_no_mask(
    netns: str, data: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    images, model, local = data
    script = tmp_path / "killing_run.py"
    script.write_text(KILLING_RUN)
    out, marker = tmp_path / "ray", tmp_path / "killed.pid"
    run = in_netns(netns, [str(script), str(images), str(model), str(out), str(marker)])
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    assert marker.is_file()  # a worker process did die, mid-run, and it was not the driver
    assert int(marker.read_text()) != summary["driver"]
    assert summary["processed"] == IMAGES
    assert [f["path"] for f in summary["failed"]] == [str(images / "broken.jpg")]
    assert files(out) == files(local)


@pytest.mark.slow
def test_an_unreachable_ray_address_exits_2_in_one_line(
    netns: str, data: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    images, model, _ = data
    out = tmp_path / "never"
    run = in_netns(
        netns,
        [
            "-m",
            "cosa.app.cli",
            "segment",
            str(images),
            "--out",
            str(out),
            "--model",
            str(model),
            "--engine",
            "ray",
            "--ray-address",
            "127.0.0.1:9",
        ],
        timeout=60,
    )
    assert run.returncode == 2, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "127.0.0.1:9 is not reachable" in lines[0]
    assert "ray start --head" in lines[0] and not out.exists()


def test_without_ray_the_engine_exits_2_naming_the_extra(
    data: tuple[Path, Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    images, model, _ = data
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    out = tmp_path / "never"
    result = CliRunner().invoke(
        app,
        ["segment", str(images), "--out", str(out), "--model", str(model), "--engine", "ray"],
    )
    assert result.exit_code == 2
    assert INSTALL_HINT in result.output and len(result.output.strip().splitlines()) == 1
    assert not out.exists()


def test_ray_options_need_the_ray_engine(data: tuple[Path, Path, Path], tmp_path: Path) -> None:
    images, model, _ = data
    result = CliRunner().invoke(
        app,
        [
            "segment",
            str(images),
            "--out",
            str(tmp_path / "o"),
            "--model",
            str(model),
            "--ray-workers",
            "2",
        ],
    )
    assert result.exit_code == 2 and "need --engine ray" in result.output
