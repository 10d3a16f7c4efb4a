"""The deployment files as a compose implementation and Kubernetes read them, for tests.

No container engine or cluster runs here, so the files are checked the way their tools
check them before running anything: ``docker-compose.yml`` against the compose-spec
JSON schema (the one compose implementations validate with; check-jsonschema bundles
it), ``deploy/k8s`` against Kubernetes' own OpenAPI schemas (``kubernetes-validate``)
and KEDA's ScaledObjects against the schema of models generated from KEDA's CRDs
(``cloudcoil.models.keda``; made strict here: an unknown field fails, as the API server
prunes or rejects it). Interpolation follows compose's rules for the forms the file uses.
"""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml

REPO = Path(__file__).resolve().parents[1]
COMPOSE = REPO / "docker-compose.yml"
K8S = REPO / "deploy" / "k8s"
KUBERNETES_VERSION = "1.30.0"


def check_compose(path: Path) -> subprocess.CompletedProcess[str]:
    """``check-jsonschema`` with the compose-spec schema it bundles."""
    tool = Path(sys.executable).with_name("check-jsonschema")
    return subprocess.run(
        [str(tool), "--builtin-schema", "vendor.compose-spec", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def compose_file(path: Path = COMPOSE) -> dict[str, Any]:
    """The compose file as compose reads it (YAML merge keys resolved)."""
    loaded: dict[str, Any] = yaml.safe_load(path.read_text())
    return loaded


_VARIABLE = re.compile(r"\$\$|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?P<op>:?[-?])?(?P<arg>[^}]*)\}")


def interpolate(text: str, env: Mapping[str, str]) -> str:
    """Compose's ``${VAR}``, ``${VAR:-default}``, ``${VAR-default}``, ``${VAR:?error}``
    and ``$$``."""

    def one(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, op, arg = match.group("name"), match.group("op"), match.group("arg")
        value = env.get(name)
        if op == ":-":
            return value if value else arg
        if op == "-":
            return value if value is not None else arg
        if op == ":?":
            if not value:
                raise KeyError(f"{name}: {arg}")
            return value
        return value or ""

    return _VARIABLE.sub(one, text)


def k8s_documents() -> Iterator[tuple[Path, dict[str, Any]]]:
    """Every object of the Kubernetes manifests (the kustomization file aside)."""
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                yield path, doc


def validate_k8s(doc: dict[str, Any]) -> None:
    """Raise ``ValueError`` naming what is wrong with one object."""
    if str(doc.get("apiVersion", "")).startswith("keda.sh/"):
        errors = sorted(
            keda_validator(doc["kind"]).iter_errors(doc), key=lambda e: list(e.absolute_path)
        )
        if errors:
            where = ".".join(str(p) for p in errors[0].absolute_path)
            raise ValueError(f"{doc['kind']} {where}: {errors[0].message}")
        return
    try:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        where = ".".join(str(p) for p in exc.path)
        raise ValueError(f"{doc['kind']} {where}: {exc.message}") from None


def _strict(schema: Any) -> Any:
    """Every object that lists its properties allows only those (the API server's
    structural schemas do not keep unknown fields)."""
    if isinstance(schema, dict):
        out = {key: _strict(value) for key, value in schema.items()}
        if "properties" in out and "additionalProperties" not in out:
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(item) for item in schema]
    return schema


_VALIDATORS: dict[str, jsonschema.Draft202012Validator] = {}


def keda_validator(kind: str) -> jsonschema.Draft202012Validator:
    if kind not in _VALIDATORS:
        from cloudcoil.models.keda import v1alpha1

        model = getattr(v1alpha1, kind)
        schema = _strict(copy.deepcopy(model.model_json_schema(by_alias=True)))
        _VALIDATORS[kind] = jsonschema.Draft202012Validator(schema)
    return _VALIDATORS[kind]


def parse_duration_s(text: str) -> float:
    """A compose duration (``45s``, ``1m30s``) in seconds."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"not a compose duration: {text!r}")
    return sum(float(n) * units[u] for n, u in parts)


def host_env(**extra: str) -> dict[str, str]:
    """This machine's environment for a service process, the fleet's variables left out."""
    prefixes = ("REDIS_URL", "CELERY_", "EMBED_FLEET_", "S3_", "AWS_", "FLOWER_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}
    env.update(extra)
    return env
