"""`cosa triton k8s`: manifests rendered for real repositories and checked against the schemas.

No cluster here: the core kinds (Deployment, Service, HorizontalPodAutoscaler) are rendered with
`kubectl kustomize` (offline) and validated with `kubernetes-validate --strict`, which rejects
unknown fields; the KServe InferenceService, which kubernetes-validate only warns about, is built
field by field into the KServe SDK's own models (`kserve.models`, `kubernetes.client` for the pod
parts), refusing any key the models do not declare.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_triton_repo import make_artifact
from typer.testing import CliRunner

from cli import app
from cosa.errors import ConfigError, ServingError
from cosa.serving.k8s_manifests import (
    MODELS_ANNOTATION,
    STORAGE_INITIALIZER_IMAGE,
    K8sOptions,
    render_manifests,
    write_manifests,
)
from cosa.serving.triton_names import ServerPorts
from cosa.serving.triton_repo import read_layout, write_repository
from cosa.serving.triton_server import CONTAINER_IMAGE

kubernetes_validate = pytest.importorskip("kubernetes_validate")


@pytest.fixture(scope="module")
def repos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Repositories of every platform: onnxruntime with the ensemble, onnxruntime without it
    (no python-backend model at all; also pinned to CPU or GPU instances), python, tensorrt (its
    engine recorded as TensorRT 10.5)."""
    root = tmp_path_factory.mktemp("repos")
    artifact = make_artifact(root / "artifact", plan=True)
    spec = json.loads((artifact / "spec.json").read_text())
    spec["tensorrt_version"] = "10.5.0"
    (artifact / "spec.json").write_text(json.dumps(spec))
    out = {
        "onnxruntime": dict(platform="onnxruntime", model_name="seg.v2_b"),
        "onnxruntime_plain": dict(platform="onnxruntime", ensemble=False),
        "python": dict(platform="python"),
        "tensorrt": dict(platform="tensorrt"),
        "onnxruntime_cpu": dict(platform="onnxruntime", instance_kind="cpu", ensemble=False),
        "onnxruntime_gpu": dict(platform="onnxruntime", instance_kind="gpu", ensemble=False),
    }
    for name, options in out.items():
        write_repository(artifact, root / name, **options)
    return {name: root / name for name in out}


def validate_core(manifest: dict[str, Any]) -> None:
    """kubernetes-validate --strict against the newest Kubernetes schema it ships."""
    version = kubernetes_validate.latest_version()
    kubernetes_validate.validate(manifest, version, strict=True)


class KServeChecker:
    """A `kserve_check.py` worker process (see there why it is a process of its own)."""

    def __init__(self) -> None:
        self._proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("kserve_check.py"))],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self._proc.stdout is not None
        assert json.loads(self._proc.stdout.readline()) == {"ready": True}

    def __call__(self, manifest: dict[str, Any]) -> None:
        """Raises ValueError with the worker's message when `manifest` does not build."""
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._proc.stdin.write(json.dumps(manifest) + "\n")
        self._proc.stdin.flush()
        error = json.loads(self._proc.stdout.readline())["error"]
        if error is not None:
            raise ValueError(error)

    def close(self) -> None:
        assert self._proc.stdin is not None
        self._proc.stdin.close()
        self._proc.wait(timeout=30)


@pytest.fixture(scope="module")
def validate_inference_service() -> Iterator[KServeChecker]:
    if importlib.util.find_spec("kserve") is None:  # not imported here: see kserve_check.py
        pytest.skip("the KServe SDK (dev extras) checks InferenceServices")
    checker = KServeChecker()
    yield checker
    checker.close()


def kustomize(folder: Path) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed")
    rendered = subprocess.run(
        [kubectl, "kustomize", str(folder)], check=True, capture_output=True, text=True
    ).stdout
    return [doc for doc in yaml.safe_load_all(rendered) if doc]


def by_kind(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {doc["kind"]: doc for doc in docs}


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    (only,) = deployment["spec"]["template"]["spec"]["containers"]
    return only


@pytest.mark.parametrize("platform", ["onnxruntime", "onnxruntime_plain", "python", "tensorrt"])
def test_kustomize_renders_valid_core_kinds_and_a_valid_inference_service(
    repos: dict[str, Path], platform: str, tmp_path: Path, validate_inference_service: KServeChecker
) -> None:
    image = "nvcr.io/nvidia/tritonserver:24.10-py3" if platform == "tensorrt" else None
    files = write_manifests(repos[platform], tmp_path / "k8s", K8sOptions(image=image))
    assert sorted(p.relative_to(tmp_path / "k8s").as_posix() for p in files) == sorted(
        [f"triton/{n}.yaml" for n in ("kustomization", "deployment", "service", "hpa")]
        + ["kserve/kustomization.yaml", "kserve/inferenceservice.yaml"]
    )
    core = by_kind(kustomize(tmp_path / "k8s" / "triton"))
    assert sorted(core) == ["Deployment", "HorizontalPodAutoscaler", "Service"]
    for manifest in core.values():
        validate_core(manifest)
    (isvc,) = kustomize(tmp_path / "k8s" / "kserve")
    validate_inference_service(isvc)
    model = isvc["spec"]["predictor"]["model"]
    assert model["modelFormat"] == {"name": "triton"} and model["runtime"] == "kserve-tritonserver"
    assert model["storageUri"] == f"pvc://cosa-model-repository/{platform}"
    assert model["protocolVersion"] == "v2" and model["runtimeVersion"] == "24.10-py3"


def test_ports_probes_and_model_names_come_from_the_repository(repos: dict[str, Path]) -> None:
    manifests = render_manifests(repos["onnxruntime"])
    deployment = manifests["triton/deployment.yaml"]
    service = manifests["triton/service.yaml"]
    server = container(deployment)
    ports = ServerPorts()
    assert {p["name"]: p["containerPort"] for p in server["ports"]} == ports._asdict()
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == ports._asdict()
    assert all(p["targetPort"] == p["name"] for p in service["spec"]["ports"])
    assert f"--grpc-port={ports.grpc}" in server["args"]
    assert "--model-repository=/models" in server["args"]
    assert server["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    assert server["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "http"}
    assert service["metadata"]["annotations"]["prometheus.io/port"] == str(ports.metrics)
    # "seg.v2_b" is not a Kubernetes name; the objects get the nearest one, the models keep theirs.
    layout = read_layout(repos["onnxruntime"])
    for manifest in manifests.values():
        if manifest["kind"] != "Kustomization":
            assert manifest["metadata"]["name"] == "seg-v2-b"
            assert manifest["metadata"]["annotations"][MODELS_ANNOTATION] == ",".join(layout.models)
    assert manifests["triton/hpa.yaml"]["spec"]["scaleTargetRef"]["name"] == "seg-v2-b"
    assert deployment["spec"]["selector"]["matchLabels"] == service["spec"]["selector"]


def test_python_models_get_their_packages_and_shared_memory_others_do_not(
    repos: dict[str, Path],
) -> None:
    with_python = render_manifests(repos["python"])
    server = container(with_python["triton/deployment.yaml"])
    assert server["command"][:2] == ["bash", "-c"]
    assert (
        'pip install --quiet "numpy<2" onnxruntime Pillow && exec tritonserver "$@"'
        in (server["command"][2])
    )
    assert {"name": "dshm", "mountPath": "/dev/shm"} in server["volumeMounts"]
    assert "nvidia.com/gpu" not in server["resources"]["limits"]  # python: CPU by default
    model = with_python["kserve/inferenceservice.yaml"]["spec"]["predictor"]["model"]
    assert model["command"] == server["command"] and "args" not in model

    plain = render_manifests(repos["onnxruntime_plain"])
    server = container(plain["triton/deployment.yaml"])
    assert server["command"] == ["tritonserver"]
    assert all(m["name"] != "dshm" for m in server["volumeMounts"])
    assert server["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert "command" not in plain["kserve/inferenceservice.yaml"]["spec"]["predictor"]["model"]


def test_storage_uri_pvc_is_mounted_others_are_fetched_by_an_init_container(
    repos: dict[str, Path],
) -> None:
    pvc = render_manifests(repos["python"], K8sOptions(storage_uri="pvc://models/prod/seg/"))
    pod = pvc["triton/deployment.yaml"]["spec"]["template"]["spec"]
    assert "initContainers" not in pod
    assert pod["volumes"][0]["persistentVolumeClaim"] == {"claimName": "models", "readOnly": True}
    assert container(pvc["triton/deployment.yaml"])["volumeMounts"][0]["subPath"] == "prod/seg"

    s3 = render_manifests(repos["python"], K8sOptions(storage_uri="s3://bucket/repo"))
    pod = s3["triton/deployment.yaml"]["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    assert init["image"] == STORAGE_INITIALIZER_IMAGE and init["args"] == [
        "s3://bucket/repo",
        "/models",
    ]
    assert pod["volumes"][0] == {"name": "model-repository", "emptyDir": {}}
    isvc = s3["kserve/inferenceservice.yaml"]["spec"]["predictor"]["model"]
    assert isvc["storageUri"] == "s3://bucket/repo"


def test_replicas_gpus_and_image_reach_every_manifest(repos: dict[str, Path]) -> None:
    options = K8sOptions(replicas=3, max_replicas=7, gpus=2, image="registry.example/triton:1")
    manifests = render_manifests(repos["onnxruntime"], options)
    assert manifests["triton/deployment.yaml"]["spec"]["replicas"] == 3
    hpa = manifests["triton/hpa.yaml"]["spec"]
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (3, 7)
    server = container(manifests["triton/deployment.yaml"])
    assert server["image"] == "registry.example/triton:1"
    assert server["resources"]["limits"]["nvidia.com/gpu"] == "2"
    predictor = manifests["kserve/inferenceservice.yaml"]["spec"]["predictor"]
    assert (predictor["minReplicas"], predictor["maxReplicas"]) == (3, 7)
    # Not NVIDIA's repository: the image itself replaces the runtime's, not just its tag.
    assert predictor["model"]["image"] == "registry.example/triton:1"
    assert "runtimeVersion" not in predictor["model"]
    assert predictor["model"]["resources"]["limits"]["nvidia.com/gpu"] == "2"
    default = render_manifests(repos["onnxruntime"])
    assert container(default["triton/deployment.yaml"])["image"] == CONTAINER_IMAGE


FIELD_TYPOS = [
    ("triton/deployment.yaml", ("spec", "template", "spec", "containers", 0), "readinessProbe"),
    ("triton/service.yaml", ("spec", "ports", 0), "targetPort"),
    ("triton/hpa.yaml", ("spec",), "maxReplicas"),
]


@pytest.mark.parametrize(("file", "where", "field"), FIELD_TYPOS)
def test_a_misspelled_core_field_is_rejected(
    repos: dict[str, Path], file: str, where: tuple[Any, ...], field: str
) -> None:
    manifest = copy.deepcopy(render_manifests(repos["onnxruntime"])[file])
    validate_core(manifest)
    node = manifest
    for key in where:
        node = node[key]
    node[field[:-1] + field[-1].upper()] = node.pop(field)  # e.g. readinessProbE
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_core(manifest)


@pytest.mark.parametrize(
    ("path", "typo"),
    [
        (("spec", "predictor", "model"), ("storageUri", "storageUrl")),
        (("spec", "predictor", "model", "modelFormat"), ("name", "nmae")),
        (("spec", "predictor"), ("minReplicas", "minReplica")),
        (("spec", "predictor", "model", "resources"), ("limits", "limit")),
    ],
)
def test_a_misspelled_inference_service_field_is_rejected(
    repos: dict[str, Path],
    path: tuple[str, ...],
    typo: tuple[str, str],
    validate_inference_service: KServeChecker,
) -> None:
    manifest = copy.deepcopy(render_manifests(repos["python"])["kserve/inferenceservice.yaml"])
    validate_inference_service(manifest)
    node = manifest
    for key in path:
        node = node[key]
    right, wrong = typo
    node[wrong] = node.pop(right)
    with pytest.raises(ValueError, match=wrong):
        validate_inference_service(manifest)


def test_a_missing_required_inference_service_field_is_rejected(
    repos: dict[str, Path], validate_inference_service: KServeChecker
) -> None:
    manifest = copy.deepcopy(render_manifests(repos["python"])["kserve/inferenceservice.yaml"])
    del manifest["spec"]["predictor"]["model"]["volumeMounts"][0]["mountPath"]
    with pytest.raises(ValueError, match="mountPath"):
        validate_inference_service(manifest)


@pytest.mark.parametrize(
    ("platform", "args", "message"),
    [
        ("python", ["--gpu", "1"], "'cosa_seg' (python) runs on the CPU (KIND_CPU); drop --gpu"),
        ("onnxruntime_cpu", ["--gpu", "1"], "(onnxruntime_onnx) runs on the CPU (KIND_CPU)"),
        ("tensorrt", [], "built with TensorRT 10.5.0"),
        ("tensorrt", ["--image", "x:1", "--gpu", "0"], "runs only on a GPU (KIND_GPU)"),
        ("onnxruntime_gpu", ["--gpu", "0"], "runs only on a GPU (KIND_GPU)"),
        ("python", ["--replicas", "0"], "--replicas 0 must be >= 1"),
        ("python", ["--replicas", "3", "--max-replicas", "2"], "below --replicas 3"),
        ("python", ["--storage-uri", "/data/repo"], "not a storage URI"),
        ("python", ["--storage-uri", "ftp://host/repo"], "not a storage URI"),
        ("python", ["--name", "Cosa_Seg"], "is not a Kubernetes name"),
        ("python", ["--memory", "4 GB"], "not a Kubernetes quantity"),
    ],
)
def test_options_that_do_not_fit_exit_2_with_one_line(
    repos: dict[str, Path], tmp_path: Path, platform: str, args: list[str], message: str
) -> None:
    out = tmp_path / "k8s"
    result = CliRunner().invoke(
        app, ["triton", "k8s", str(repos[platform]), "--out", str(out), *args]
    )
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not out.exists()


def test_a_missing_or_foreign_repository_exits_2(tmp_path: Path) -> None:
    runner = CliRunner()
    missing = runner.invoke(
        app, ["triton", "k8s", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]
    )
    assert missing.exit_code == 2
    assert "model repository" in missing.output and "cosa triton repo" in missing.output
    foreign = runner.invoke(app, ["triton", "k8s", str(tmp_path), "--out", str(tmp_path / "o")])
    assert foreign.exit_code == 2 and "cosa_repository.json" in foreign.output
    with pytest.raises(ServingError, match="not found"):
        render_manifests(tmp_path / "nope")


def test_existing_output_is_replaced_only_when_asked_and_only_if_ours(
    repos: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "k8s"
    write_manifests(repos["python"], out)
    with pytest.raises(ConfigError, match="--overwrite"):
        write_manifests(repos["python"], out, K8sOptions(replicas=2))
    write_manifests(repos["python"], out, K8sOptions(replicas=2), overwrite=True)
    assert yaml.safe_load((out / "triton" / "deployment.yaml").read_text())["spec"]["replicas"] == 2
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    with pytest.raises(ConfigError, match="not a folder written by"):
        write_manifests(repos["python"], foreign, overwrite=True)
    assert (foreign / "notes.txt").read_text() == "keep"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
