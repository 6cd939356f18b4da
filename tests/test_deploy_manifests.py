"""The Kubernetes manifests under deploy/k8s, validated offline: built-in kinds against the Kubernetes
schemas kubernetes-validate ships, the KubeRay RayService against KubeRay's CRD schema kept beside them
(deploy/k8s/schemas), both strictly (an unknown or misspelt field fails)."""
from __future__ import annotations

import copy
import importlib
import json
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from servelm.deploy.ray_serve import scaling_problem
from servelm.server.settings import ServerSettings

K8S = Path(__file__).resolve().parent.parent / "deploy" / "k8s"
KUBERNETES_VERSIONS = ("1.29", "1.37")  # the oldest release still in common support, and the newest shipped


def _documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _manifests() -> list[tuple[str, dict]]:
    return [(f"{p.relative_to(K8S)}:{d['kind']}", d) for p in sorted(K8S.rglob("*.yaml"))
            if p.name != "kustomization.yaml" for d in _documents(p)]


def _strict(schema):
    """Returns ``schema`` with every object that lists its properties closed to others, as the API server's
    field validation (``kubectl --validate=strict``) refuses unknown fields."""
    schema = copy.deepcopy(schema)

    def close(node):
        if isinstance(node, dict):
            if ("properties" in node and "additionalProperties" not in node
                    and not node.get("x-kubernetes-preserve-unknown-fields")):
                node["additionalProperties"] = False
            for value in node.values():
                close(value)
        elif isinstance(node, list):
            for value in node:
                close(value)

    close(schema)
    return schema


BUILT_IN = [(name, doc) for name, doc in _manifests() if doc["kind"] != "RayService"]


@pytest.mark.parametrize("name, doc", BUILT_IN, ids=[n for n, _ in BUILT_IN])
@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_each_manifest_is_valid_for_kubernetes(name, doc, version):
    kubernetes_validate.validate(doc, version, strict=True)


def test_the_base_has_the_deployment_service_autoscaler_and_disruption_budget_and_kustomize_finds_them():
    kustomization = yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())
    kinds = {d["kind"] for r in kustomization["resources"] for d in _documents(K8S / "base" / r)}
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"} <= kinds
    (deployment,) = [d for d in _documents(K8S / "base" / "deployment.yaml")]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    # every selector matches the pods the Deployment makes
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    for r in kustomization["resources"]:
        for d in _documents(K8S / "base" / r):
            selector = d.get("spec", {}).get("selector")
            if selector:
                assert (selector.get("matchLabels", selector)).items() <= pod_labels.items(), d["kind"]


def test_the_autoscaler_reads_the_metric_the_adapter_rule_serves():
    (hpa,) = _documents(K8S / "base" / "hpa.yaml")
    (rules,) = _documents(K8S / "base" / "prometheus-adapter-rules.yaml")
    (rule,) = yaml.safe_load(rules["data"]["config.yaml"])["rules"]
    served = rule["name"]["as"].replace("${1}", "num_requests_waiting")
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == served
    assert rule["seriesQuery"].startswith("servelm:num_requests_waiting{")  # the server's queue gauge


def test_the_rayservice_is_valid_for_kuberay_and_its_serve_config_builds_servelm():
    schema = json.loads((K8S / "schemas" / "rayservice-ray.io-v1.json").read_text())
    (service,) = _documents(K8S / "kuberay" / "rayservice.yaml")
    assert (service["apiVersion"], service["kind"]) == ("ray.io/v1", "RayService")
    jsonschema.validate(service, _strict(schema))
    serve_config = yaml.safe_load(service["spec"]["serveConfigV2"])
    (app,) = serve_config["applications"]
    module, name = app["import_path"].split(":")
    assert callable(getattr(importlib.import_module(module), name))
    args = dict(app["args"])
    args.pop("replica_num_gpus")
    assert scaling_problem(ServerSettings(**args)) is None
    # the Ray in the image is the one the cluster announces
    assert service["spec"]["rayClusterConfig"]["rayVersion"] == importlib.import_module("ray").__version__


def test_a_misspelt_field_fails_validation():
    (deployment,) = _documents(K8S / "base" / "deployment.yaml")
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[-1], strict=True)
    (service,) = _documents(K8S / "kuberay" / "rayservice.yaml")
    service["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplica"] = 4
    schema = json.loads((K8S / "schemas" / "rayservice-ray.io-v1.json").read_text())
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(service, _strict(schema))
