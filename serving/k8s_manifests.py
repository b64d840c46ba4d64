"""Kubernetes manifests that serve a Triton model repository (`cosa triton k8s`).

Everything is read from the repository `cosa triton repo` wrote: its layout file (model names,
platform), the models' config.pbtxt (which backends the server needs) and the segmentation model's
spec.json (the TensorRT an engine was built with). Ports are Triton's own defaults as declared once
in `ServerPorts`. Output, two kustomize bases (`kubectl apply -k OUT/triton` or `OUT/kserve`):

    OUT/
      triton/kustomization.yaml
      triton/deployment.yaml     NVIDIA's Triton image, probes on /v2/health/{ready,live}
      triton/service.yaml        http, grpc and metrics ports
      triton/hpa.yaml            HorizontalPodAutoscaler (autoscaling/v2, CPU utilisation)
      kserve/kustomization.yaml
      kserve/inferenceservice.yaml   KServe, runtime kserve-tritonserver, modelFormat triton

Where the repository lives in the cluster is one storage URI with KServe's meaning, used by both:
`pvc://CLAIM/PATH` is mounted read-only; any other scheme (s3://, gs://, https://, ...) is copied
into an emptyDir by KServe's storage-initializer image as an init container in the Deployment (the
same image KServe itself runs for an InferenceService).

Python-backend models (the python platform, and the ensemble's pre/post-processing models) need
numpy<2, onnxruntime and Pillow, which NVIDIA's image lacks: their container installs them at start
(`python_env_install`) and gets a memory-backed /dev/shm, as `docker_command` does.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from cosa.errors import ConfigError, CosaError, ServingError
from cosa.export.spec import read_spec
from cosa.files import replace_folder
from cosa.serving.triton_names import ServerPorts
from cosa.serving.triton_repo import RepositoryLayout, read_layout
from cosa.serving.triton_server import (
    CONTAINER_IMAGE,
    PYTHON_BACKEND_SHM_MIB,
    model_configs,
    python_env_install,
)

__all__ = [
    "KSERVE_RUNTIME",
    "STORAGE_INITIALIZER_IMAGE",
    "K8sOptions",
    "render_manifests",
    "write_manifests",
]

KSERVE_RUNTIME = "kserve-tritonserver"  # KServe's ClusterServingRuntime for Triton
# KServe's storage initializer (the init container an InferenceService gets); the version is that
# of the KServe SDK the InferenceService is validated against in the tests.
STORAGE_INITIALIZER_IMAGE = "kserve/storage-initializer:v0.21.0"
GPU_RESOURCE = "nvidia.com/gpu"  # NVIDIA's device plugin
MODEL_MOUNT = "/models"
MODELS_ANNOTATION = "cosa-toolkit/models"
_STORAGE_SCHEMES = ("pvc", "s3", "gs", "https", "http", "hdfs", "webhdfs", "hf", "oci")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|Ki|M|Mi|G|Gi|T|Ti)?$")
_WRITTEN_FILES = ("triton/kustomization.yaml", "kserve/kustomization.yaml")


@dataclass(frozen=True)
class K8sOptions:
    """What the manifests ask of the cluster; None = derived from the repository.

    Attributes:
        storage_uri: where the repository is in the cluster; default
            `pvc://cosa-model-repository/<repository folder name>`.
        replicas: pods at start and the autoscaler's minimum (>= 1).
        max_replicas: the autoscaler's maximum; default 2 x replicas.
        gpus: GPUs per pod; default 1 for onnxruntime and tensorrt, 0 for python repositories.
        image: Triton image; default `CONTAINER_IMAGE`. Required for TensorRT engines, which only
            run under the TensorRT that built them.
        name: Kubernetes name of every object; default the segmentation model's name made a DNS
            label ("cosa_seg" -> "cosa-seg").
        cpu, memory: requests per pod (Kubernetes quantities); memory is also the limit. The
            autoscaler's utilisation is relative to the CPU request.
        target_cpu_percent: average CPU utilisation the autoscaler aims for.
    """

    storage_uri: str | None = None
    replicas: int = 1
    max_replicas: int | None = None
    gpus: int | None = None
    image: str | None = None
    name: str | None = None
    cpu: str = "2"
    memory: str = "4Gi"
    target_cpu_percent: int = 80


@dataclass(frozen=True)
class _Plan:
    """The options resolved against one repository."""

    layout: RepositoryLayout
    name: str
    storage_uri: str
    replicas: int
    max_replicas: int
    gpus: int
    image: str
    cpu: str
    memory: str
    target_cpu_percent: int
    python_models: bool  # some model runs on the python backend


def render_manifests(repo: Path, options: K8sOptions = K8sOptions()) -> dict[str, dict[str, Any]]:
    """The manifests for `repo`, as {relative file name: object}, kustomizations included.

    Raises:
        ServingError: `repo` is missing or not written by `cosa triton repo`, or a config.pbtxt
            does not parse.
        ConfigError: an option that does not fit the repository (GPUs for a python-backend
            segmentation model, no GPU or no --image for a TensorRT engine, bad names/quantities).
    """
    plan = _plan(repo, options)
    triton = {
        "triton/deployment.yaml": _deployment(plan),
        "triton/service.yaml": _service(plan),
        "triton/hpa.yaml": _hpa(plan),
    }
    kserve = {"kserve/inferenceservice.yaml": _inference_service(plan)}
    return {
        "triton/kustomization.yaml": _kustomization(triton),
        **triton,
        "kserve/kustomization.yaml": _kustomization(kserve),
        **kserve,
    }


def write_manifests(
    repo: Path, out: Path, options: K8sOptions = K8sOptions(), *, overwrite: bool = False
) -> list[Path]:
    """Writes `render_manifests(repo, options)` under `out` as YAML; returns the files written.

    The folder is assembled beside `out` and swapped into place: `out` never holds a mix.

    Raises:
        ServingError, ConfigError: see `render_manifests`; also `out` exists and `overwrite` is
            off, or it is not a folder this function wrote.
    """
    manifests = render_manifests(repo, options)
    _check_out(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        for relative, manifest in manifests.items():
            path = staged / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(yaml.safe_dump(manifest, sort_keys=False))
        replace_folder(staged, out)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    return [out / relative for relative in manifests]


def _check_out(out: Path, overwrite: bool) -> None:
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return
    if not overwrite:
        raise ConfigError(f"{out} already exists; choose another --out or pass --overwrite")
    if not all((out / name).is_file() for name in _WRITTEN_FILES):
        raise ConfigError(
            f"{out} is not a folder written by `cosa triton k8s`; refusing to replace it: "
            "choose another --out"
        )


def _plan(repo: Path, options: K8sOptions) -> _Plan:
    if not repo.is_dir():
        raise ServingError(
            f"model repository {repo} not found; build it with `cosa triton repo ARTIFACT_DIR "
            f"--out {repo}`"
        )
    layout = read_layout(repo)
    configs = model_configs(repo)
    missing = [m for m in layout.models if m not in configs]
    if missing:
        raise ServingError(
            f"{repo} lists model(s) {missing} in its layout file but has no config.pbtxt for "
            "them; rebuild it with `cosa triton repo`"
        )
    name = options.name or re.sub(r"[^a-z0-9-]+", "-", layout.segmentation.lower()).strip("-")
    if not _DNS_LABEL.match(name) or len(name) > 63:
        raise ConfigError(
            f"--name {name!r} is not a Kubernetes name: lower-case letters, digits and '-', "
            "starting and ending with a letter or digit, at most 63 characters"
        )
    if options.replicas < 1:
        raise ConfigError(f"--replicas {options.replicas} must be >= 1")
    max_replicas = options.max_replicas or 2 * options.replicas
    if max_replicas < options.replicas:
        raise ConfigError(
            f"--max-replicas {max_replicas} is below --replicas {options.replicas}; raise it"
        )
    if not 1 <= options.target_cpu_percent <= 100:
        raise ConfigError(f"target CPU utilisation {options.target_cpu_percent}% is not in 1-100")
    for option, value in (("--cpu", options.cpu), ("--memory", options.memory)):
        if not _QUANTITY.match(value):
            raise ConfigError(
                f"{option} {value!r} is not a Kubernetes quantity (e.g. 500m, 2, 4Gi)"
            )
    return _Plan(
        layout=layout,
        name=name,
        storage_uri=_storage_uri(options.storage_uri, repo),
        replicas=options.replicas,
        max_replicas=max_replicas,
        gpus=_gpus(layout, configs[layout.segmentation], options.gpus),
        image=_image(repo, layout, options.image),
        cpu=options.cpu,
        memory=options.memory,
        target_cpu_percent=options.target_cpu_percent,
        python_models=any(config.backend == "python" for config in configs.values()),
    )


def _storage_uri(uri: str | None, repo: Path) -> str:
    if uri is None:
        return f"pvc://cosa-model-repository/{repo.resolve().name}"
    scheme, sep, rest = uri.partition("://")
    if not sep or scheme not in _STORAGE_SCHEMES or not rest.strip("/"):
        raise ConfigError(
            f"--storage-uri {uri!r} is not a storage URI KServe reads; use pvc://CLAIM/PATH or "
            f"one of {', '.join(s + '://' for s in _STORAGE_SCHEMES if s != 'pvc')}"
        )
    return uri


def _gpus(layout: RepositoryLayout, segmentation: Any, gpus: int | None) -> int:
    """GPUs per pod, checked against where the segmentation model's instances run: the kinds
    of its config.pbtxt `instance_group` (KIND_CPU, KIND_GPU, KIND_AUTO)."""
    from tritonclient.grpc import model_config_pb2

    name = model_config_pb2.ModelInstanceGroup.Kind.Name
    kinds = {name(group.kind) for group in segmentation.instance_group} or {"KIND_AUTO"}
    runtime = segmentation.backend or segmentation.platform
    where = f"its segmentation model {layout.segmentation!r} ({runtime})"
    if gpus is None:
        return 0 if kinds == {"KIND_CPU"} else 1
    if gpus < 0:
        raise ConfigError(f"--gpu {gpus} must be >= 0")
    if gpus > 0 and kinds == {"KIND_CPU"}:
        raise ConfigError(
            f"--gpu {gpus} does not fit {layout.root}: {where} runs on the CPU (KIND_CPU); drop "
            "--gpu, or rebuild the repository with `cosa triton repo ARTIFACT_DIR --platform "
            "onnxruntime` (or tensorrt)"
        )
    if gpus == 0 and "KIND_GPU" in kinds:
        raise ConfigError(
            f"--gpu 0 does not fit {layout.root}: {where} runs only on a GPU (KIND_GPU); pass "
            "--gpu 1 or more"
        )
    return gpus


def _image(repo: Path, layout: RepositoryLayout, image: str | None) -> str:
    """The Triton image; a TensorRT engine needs the one that carries its TensorRT."""
    if image is not None:
        if not image.strip() or any(c.isspace() for c in image):
            raise ConfigError(f"--image {image!r} is not an image reference")
        return image
    if layout.platform == "tensorrt":
        try:
            built_with = read_spec(repo / layout.segmentation).tensorrt_version or "unknown"
        except CosaError:  # only words the message
            built_with = "unknown"
        raise ConfigError(
            f"{repo} serves a TensorRT engine built with TensorRT {built_with}, which runs only "
            "under that TensorRT: pass --image nvcr.io/nvidia/tritonserver:YY.MM-py3 of the "
            "release that carries it (docs/deployment.md)"
        )
    return CONTAINER_IMAGE


def _labels(plan: _Plan) -> dict[str, str]:
    return {"app.kubernetes.io/name": plan.name, "app.kubernetes.io/part-of": "cosa-toolkit"}


def _metadata(plan: _Plan) -> dict[str, Any]:
    return {
        "name": plan.name,
        "labels": _labels(plan),
        "annotations": {MODELS_ANNOTATION: ",".join(plan.layout.models)},
    }


def _resources(plan: _Plan) -> dict[str, Any]:
    limits: dict[str, Any] = {"memory": plan.memory}
    if plan.gpus:
        limits[GPU_RESOURCE] = str(plan.gpus)  # quantities are strings in every client
    return {"requests": {"cpu": plan.cpu, "memory": plan.memory}, "limits": limits}


def _python_command() -> list[str]:
    """Installs the python-backend packages, then runs tritonserver with the container's args
    (`bash -c SCRIPT NAME ARGS...`: ARGS become "$@"), whoever supplies them."""
    return ["bash", "-c", f'{python_env_install()} && exec tritonserver "$@"', "tritonserver"]


def _shm_volume() -> dict[str, Any]:
    return {
        "name": "dshm",
        "emptyDir": {"medium": "Memory", "sizeLimit": f"{PYTHON_BACKEND_SHM_MIB}Mi"},
    }


_SHM_MOUNT = {"name": "dshm", "mountPath": "/dev/shm"}


def _deployment(plan: _Plan) -> dict[str, Any]:
    ports = ServerPorts()
    container: dict[str, Any] = {"name": "tritonserver", "image": plan.image}
    if plan.python_models:
        container["command"] = _python_command()
    else:
        container["command"] = ["tritonserver"]
    container["args"] = [
        f"--model-repository={MODEL_MOUNT}",
        f"--http-port={ports.http}",
        f"--grpc-port={ports.grpc}",
        f"--metrics-port={ports.metrics}",
    ]
    container["ports"] = [
        {"name": name, "containerPort": port, "protocol": "TCP"}
        for name, port in ports._asdict().items()
    ]
    # Startup covers the package install and model loading (minutes for large engines); then a
    # pod leaves the Service while not ready and is restarted when the server stops answering.
    container["startupProbe"] = _probe("/v2/health/live", period=10, failures=60)
    container["readinessProbe"] = _probe("/v2/health/ready", period=5, failures=3)
    container["livenessProbe"] = _probe("/v2/health/live", period=10, failures=3)
    container["resources"] = _resources(plan)
    mounts = [{"name": "model-repository", "mountPath": MODEL_MOUNT, "readOnly": True}]
    volumes: list[dict[str, Any]] = []
    init_containers: list[dict[str, Any]] = []
    scheme, _, rest = plan.storage_uri.partition("://")
    if scheme == "pvc":
        claim, _, sub_path = rest.partition("/")
        volumes.append(
            {
                "name": "model-repository",
                "persistentVolumeClaim": {"claimName": claim, "readOnly": True},
            }
        )
        if sub_path.strip("/"):
            mounts[0]["subPath"] = sub_path.strip("/")
    else:
        volumes.append({"name": "model-repository", "emptyDir": {}})
        init_containers.append(
            {
                "name": "storage-initializer",
                "image": STORAGE_INITIALIZER_IMAGE,
                "args": [plan.storage_uri, MODEL_MOUNT],
                "volumeMounts": [{"name": "model-repository", "mountPath": MODEL_MOUNT}],
            }
        )
    if plan.python_models:
        volumes.append(_shm_volume())
        mounts.append(_SHM_MOUNT)
    container["volumeMounts"] = mounts
    pod: dict[str, Any] = {}
    if init_containers:
        pod["initContainers"] = init_containers
    pod["containers"] = [container]
    pod["volumes"] = volumes
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(plan),
        "spec": {
            "replicas": plan.replicas,
            "selector": {"matchLabels": _labels(plan)},
            "template": {"metadata": {"labels": _labels(plan)}, "spec": pod},
        },
    }


def _probe(path: str, period: int, failures: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": "http"},
        "periodSeconds": period,
        "failureThreshold": failures,
    }


def _service(plan: _Plan) -> dict[str, Any]:
    ports = ServerPorts()
    metadata = _metadata(plan)
    metadata["annotations"].update(
        {"prometheus.io/scrape": "true", "prometheus.io/port": str(ports.metrics)}
    )
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata,
        "spec": {
            "selector": _labels(plan),
            "ports": [
                {"name": name, "port": port, "targetPort": name, "protocol": "TCP"}
                for name, port in ports._asdict().items()
            ],
        },
    }


def _hpa(plan: _Plan) -> dict[str, Any]:
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": _metadata(plan),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": plan.name},
            "minReplicas": plan.replicas,
            "maxReplicas": plan.max_replicas,
            "metrics": [
                {
                    "type": "Resource",
                    "resource": {
                        "name": "cpu",
                        "target": {
                            "type": "Utilization",
                            "averageUtilization": plan.target_cpu_percent,
                        },
                    },
                }
            ],
        },
    }


def _inference_service(plan: _Plan) -> dict[str, Any]:
    model: dict[str, Any] = {
        "modelFormat": {"name": "triton"},
        "runtime": KSERVE_RUNTIME,
        "protocolVersion": "v2",
        "storageUri": plan.storage_uri,
    }
    # The runtime's image is nvcr.io/nvidia/tritonserver; runtimeVersion picks its tag.
    repository, _, tag = plan.image.rpartition(":")
    if repository == CONTAINER_IMAGE.rpartition(":")[0] and tag:
        model["runtimeVersion"] = tag
    else:
        model["image"] = plan.image
    if plan.python_models:
        model["command"] = _python_command()  # the runtime's args pass through as "$@"
        model["volumeMounts"] = [_SHM_MOUNT]
    model["resources"] = _resources(plan)
    predictor: dict[str, Any] = {
        "minReplicas": plan.replicas,
        "maxReplicas": plan.max_replicas,
        "model": model,
    }
    if plan.python_models:
        predictor["volumes"] = [_shm_volume()]
    return {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": _metadata(plan),
        "spec": {"predictor": predictor},
    }


def _kustomization(manifests: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [Path(name).name for name in manifests],
    }
