"""Checks KServe manifests against the KServe SDK's models, in a process of its own.

`kserve` cannot be imported beside `tritonclient.grpc`: both register the same `inference.*`
protobuf symbols ("duplicate symbol 'inference.ServerLiveRequest'"). So the tests run this file as
a worker: one JSON manifest per stdin line in, one JSON line out, `{"error": null}` when the
manifest builds into the SDK's models and `{"error": "where: what"}` when it does not.

Building is strict where the SDK's own deserializer is lenient: a key that the model does not
declare is an error (with its path), as are values of the wrong type and what the models' setters
refuse (required fields, enums).
"""

from __future__ import annotations

import json
import sys
from typing import Any

_SCALARS: dict[str, type | tuple[type, ...]] = {
    "str": str,
    "int": int,
    "bool": bool,
    "float": (int, float),
    "datetime": str,
    "bytes": str,
}


def build(data: Any, type_name: str, where: str) -> Any:
    """`data` (parsed YAML/JSON) built into the SDK model named `type_name`.

    Raises:
        ValueError: see the module docstring.
    """
    import kserve.models
    import kubernetes.client

    # KServe's models spell containers "list[X]" / "dict(str, X)", the Kubernetes client's
    # "List[X]" / "Dict[str, X]".
    if type_name.startswith(("list[", "List[")):
        if not isinstance(data, list):
            raise ValueError(f"{where}: expected a list, got {data!r}")
        return [build(v, type_name[5:-1], f"{where}[{i}]") for i, v in enumerate(data)]
    if type_name.startswith(("dict(str, ", "Dict[str, ")):
        if not isinstance(data, dict):
            raise ValueError(f"{where}: expected a mapping, got {data!r}")
        value_type = type_name[len("dict(str, ") : -1]
        return {k: build(v, value_type, f"{where}.{k}") for k, v in data.items()}
    if type_name in _SCALARS:
        if not isinstance(data, _SCALARS[type_name]) or (type_name == "int" and data is True):
            raise ValueError(f"{where}: expected {type_name}, got {data!r}")
        return data
    if type_name in ("object", "ResourceQuantity"):
        return data
    cls = getattr(kserve.models, type_name, None) or getattr(kubernetes.client, type_name)
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a {type_name} mapping, got {data!r}")
    attributes = {key: attr for attr, key in cls.attribute_map.items()}
    unknown = sorted(set(data) - set(attributes))
    if unknown:
        raise ValueError(f"{where}: {type_name} has no field(s) {unknown}")
    values = {
        attributes[key]: build(value, cls.openapi_types[attributes[key]], f"{where}.{key}")
        for key, value in data.items()
    }
    try:
        return cls(**values)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{where}: {exc}") from None


def main() -> None:
    import kserve.models  # noqa: F401 - fail at start, not on the first manifest

    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        manifest = json.loads(line)
        try:
            build(manifest, "V1beta1InferenceService", manifest.get("kind", "?"))
            error = None
        except ValueError as exc:
            error = str(exc)
        print(json.dumps({"error": error}), flush=True)


if __name__ == "__main__":
    main()
