"""deploy/kubernetes validates offline and agrees with the configuration it ships.

Core resources (Namespace, ConfigMap, Secret, PVC, Deployment, Service) are checked
against the Kubernetes OpenAPI schemas that ``kubernetes-validate`` carries (strict: an
unknown field is an error). The custom resources (ServiceMonitor, InferencePool,
InferenceObjective) are checked against the fields of their published CRDs, written out
below by hand (required fields, types, enums): no cluster and no download is needed.
Then the pieces must agree: the ConfigMap's config.toml is a valid vram-llm config, and
its port, key file, runtime dir and shutdown grace match what the Deployment gives it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from supervisor.config import load_config

yaml = pytest.importorskip("yaml", reason="PyYAML is needed to read the manifests (pip install pyyaml)")
jsonschema = pytest.importorskip("jsonschema", reason="jsonschema is needed for the CRD checks")
kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is in the test extras (pip install -e .[test])")

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
K8S = DEPLOY / "kubernetes"
K8S_VERSION = "1.33"  # the native preStop sleep action is there (beta 1.30, on by default)


def _docs() -> list[dict[str, Any]]:
    out = []
    for f in sorted(K8S.glob("*.yaml")):
        if f.name == "kustomization.yaml":
            continue
        out.extend(d for d in yaml.safe_load_all(f.read_text()) if d)
    return out


def _one(kind: str) -> dict[str, Any]:
    found = [d for d in _docs() if d["kind"] == kind]
    assert len(found) == 1, (kind, len(found))
    return found[0]


_NAME = {"type": "string", "minLength": 1, "maxLength": 253}
_PORT = {"type": "integer", "minimum": 1, "maximum": 65535}
_DURATION = "^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"  # Prometheus
_META = {"type": "object", "required": ["name"], "properties": {"name": _NAME}}


def _crd(api: str, kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "properties": {
            "apiVersion": {"const": api},
            "kind": {"const": kind},
            "metadata": _META,
            "spec": spec,
        },
    }


# The fields we use, as the published CRDs declare them (InferencePool v1 and
# InferenceObjective v1alpha2 of the Gateway API Inference Extension; ServiceMonitor v1
# of the Prometheus Operator). additionalProperties false: a misspelt field fails here
# as the API server would reject it.
CRD_SCHEMAS: dict[str, dict[str, Any]] = {
    "InferencePool": _crd("inference.networking.k8s.io/v1", "InferencePool", {
        "type": "object",
        "required": ["selector", "targetPorts", "endpointPickerRef"],
        "additionalProperties": False,
        "properties": {
            "selector": {
                "type": "object", "required": ["matchLabels"], "additionalProperties": False,
                "properties": {"matchLabels": {"type": "object", "additionalProperties": {"type": "string", "maxLength": 63}}},
            },
            "targetPorts": {
                "type": "array", "minItems": 1, "maxItems": 1,
                "items": {"type": "object", "required": ["number"], "additionalProperties": False,
                          "properties": {"number": _PORT}},
            },
            "endpointPickerRef": {
                "type": "object", "required": ["name"], "additionalProperties": False,
                "properties": {
                    "group": {"type": "string"},
                    "kind": {"type": "string", "minLength": 1, "maxLength": 63},
                    "name": _NAME,
                    "port": {"type": "object", "required": ["number"], "additionalProperties": False,
                             "properties": {"number": _PORT}},
                    "failureMode": {"enum": ["FailOpen", "FailClose"]},
                },
            },
        },
    }),
    "InferenceObjective": _crd("inference.networking.x-k8s.io/v1alpha2", "InferenceObjective", {
        "type": "object",
        "required": ["poolRef"],
        "additionalProperties": False,
        "properties": {
            "priority": {"type": "integer"},
            "poolRef": {"type": "object", "required": ["name"], "additionalProperties": False,
                        "properties": {"name": _NAME, "group": {"type": "string"}, "kind": {"type": "string"}}},
        },
    }),
    "ServiceMonitor": _crd("monitoring.coreos.com/v1", "ServiceMonitor", {
        "type": "object",
        "required": ["selector", "endpoints"],
        "properties": {
            "selector": {"type": "object", "properties": {"matchLabels": {"type": "object"}}},
            "endpoints": {
                "type": "array", "minItems": 1,
                "items": {
                    "type": "object",
                    "properties": {
                        "port": {"type": "string"},
                        "path": {"type": "string", "pattern": "^/"},
                        "interval": {"type": "string", "pattern": _DURATION},
                        "authorization": {
                            "type": "object", "additionalProperties": False,
                            "properties": {
                                "type": {"type": "string"},
                                "credentials": {"type": "object", "required": ["key"], "additionalProperties": False,
                                                "properties": {"name": {"type": "string"}, "key": {"type": "string"},
                                                               "optional": {"type": "boolean"}}},
                            },
                        },
                    },
                },
            },
        },
    }),
}


def test_core_resources_validate_against_the_kubernetes_schemas() -> None:
    core = [d for d in _docs() if d["kind"] not in CRD_SCHEMAS]
    assert {d["kind"] for d in core} == {"Namespace", "ConfigMap", "Secret", "PersistentVolumeClaim", "Deployment", "Service"}
    for doc in core:
        kv.validate(doc, K8S_VERSION, strict=True)  # raises with the field path


def test_custom_resources_validate_against_their_crd_fields() -> None:
    crs = [d for d in _docs() if d["kind"] in CRD_SCHEMAS]
    assert {d["kind"] for d in crs} == set(CRD_SCHEMAS)
    for doc in crs:
        jsonschema.validate(doc, CRD_SCHEMAS[doc["kind"]])


def test_the_crd_check_refuses_a_misspelt_field() -> None:
    # The schemas above are strict enough to be worth running.
    bad = {**_one("InferencePool"), "spec": {**_one("InferencePool")["spec"], "targetPort": [{"number": 8080}]}}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, CRD_SCHEMAS["InferencePool"])


def test_kustomization_lists_every_manifest() -> None:
    listed = set(yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"])
    assert listed == {f.name for f in K8S.glob("*.yaml")} - {"kustomization.yaml"}


def test_the_shipped_config_is_valid_and_matches_the_deployment(tmp_path: Path) -> None:
    text = _one("ConfigMap")["data"]["config.toml"]
    (tmp_path / "config.toml").write_text(text)
    cfg = load_config(tmp_path / "config.toml")  # our own schema: unknown keys are errors
    assert cfg.server.host == "0.0.0.0"  # reachable from the Service

    dep = _one("Deployment")
    pod = dep["spec"]["template"]
    (c,) = pod["spec"]["containers"]
    labels = pod["metadata"]["labels"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports["http"] == cfg.server.port
    assert c["readinessProbe"]["httpGet"]["path"] == "/health"
    assert c["startupProbe"]["httpGet"]["path"] == "/health"
    # SIGKILL must not cut a drain the configuration allows.
    pre_stop = c["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["spec"]["terminationGracePeriodSeconds"] >= (
        pre_stop + cfg.shutdown.drain_s + cfg.shutdown.grace_s + cfg.worker.stop_timeout_s
    )

    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert mounts["/etc/vram-llm/config.toml"] == "config"
    assert cfg.server.runtime_dir in mounts and "emptyDir" in volumes[mounts[cfg.server.runtime_dir]]
    keys_dir, keys_file = cfg.server.api_keys_file.rsplit("/", 1)
    secret = volumes[mounts[keys_dir]]["secret"]
    assert keys_file in {i["path"] for i in secret["items"]}
    assert Path(cfg.model.path).parent.as_posix() in mounts

    # The Service, the pool and the metrics scrape all find the pod and its port.
    svc = _one("Service")
    assert svc["spec"]["selector"].items() <= labels.items()
    assert svc["spec"]["ports"][0]["targetPort"] == "http"
    pool = _one("InferencePool")
    assert pool["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pool["spec"]["targetPorts"][0]["number"] == cfg.server.port
    sm = _one("ServiceMonitor")
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    cred = sm["spec"]["endpoints"][0]["authorization"]["credentials"]
    sec = _one("Secret")
    assert cred["name"] == sec["metadata"]["name"] and cred["key"] in sec["stringData"]
    # The admin key Prometheus sends is one of the keys the server reads, with admin scope.
    key_lines = [line.split() for line in sec["stringData"]["api_keys"].splitlines() if line.strip()]
    assert any(k[0].split(":", 1)[-1] == sec["stringData"][cred["key"]] and k[-1] == "admin" for k in key_lines)


def test_the_image_reads_the_mounted_config() -> None:
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert '"--config", "/etc/vram-llm/config.toml"' in dockerfile
    assert "scripts/bootstrap.sh" in dockerfile  # the same set-up as `make setup`
