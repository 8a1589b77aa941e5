"""The deploy manifests (infra/deploy/k8s) parse and validate, offline, and say what the code says.

Kubernetes' own kinds are checked by `kubernetes-validate` (PyPI; it bundles the official JSON schemas of
each Kubernetes release, so nothing is fetched), strict: an unknown field is an error. KEDA's
`ScaledObject` is a CRD, which no bundled schema covers: tests/schemas/keda-scaledobject-v1alpha1.json
(written from KEDA's documented spec, its source in its `$comment`) checks it with jsonschema.
"""

from __future__ import annotations

import copy
import json
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from events.streams import CONSUMERS
from infra.natsauth import STAGES

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "infra" / "deploy" / "k8s"
KEDA_SCHEMA = json.loads((ROOT / "tests" / "schemas" / "keda-scaledobject-v1alpha1.json").read_text())
K8S_VERSION = "1.33.0"  # the oldest release the manifests are meant for; newer ones accept them too


def documents() -> list[tuple[str, dict[str, Any]]]:
    return [(f.name, d) for f in sorted(K8S.glob("*.yaml")) for d in yaml.safe_load_all(f.read_text()) if d]


def by_kind(kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for _, d in documents() if d["kind"] == kind}


def keda_errors(doc: dict[str, Any]) -> list[str]:
    validator = jsonschema.Draft202012Validator(KEDA_SCHEMA)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


def stage_consumers(stage: str) -> set[str]:
    return {c.durable for c in CONSUMERS if c.durable.split("-", 1)[0] == stage}


# a stage with no durable consumer (ollama: core-NATS request-reply only) has no lag to scale on: always on
SCALED = [s for s in STAGES if stage_consumers(s)]
ALWAYS_ON = [s for s in STAGES if not stage_consumers(s)]
IMAGE_OF = {"ollama": "serving"}  # the ollama stage runs the serving image: the same extra, the Ollama client


@pytest.mark.parametrize("version", [K8S_VERSION, kubernetes_validate.utils.latest_version()])
def test_every_manifest_validates_against_the_kubernetes_schemas(version: str) -> None:
    kinds = set()
    for name, doc in documents():
        kinds.add(doc["kind"])
        if doc["apiVersion"].startswith("keda.sh/"):
            assert keda_errors(doc) == [], f"{name}: {doc['metadata']['name']}"
        else:
            kubernetes_validate.validate(doc, version, strict=True)
    assert {"Deployment", "Service", "StatefulSet", "ConfigMap", "Job", "ScaledObject"} <= kinds


def test_the_validators_reject_what_a_cluster_would() -> None:
    """The checks above can fail: a typo, a wrong type, a number where KEDA wants a string."""
    deployment = copy.deepcopy(by_kind("Deployment")["codetune-datasets"])
    deployment["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)
    deployment = copy.deepcopy(by_kind("Deployment")["codetune-datasets"])
    deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = "30"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)

    scaled = by_kind("ScaledObject")["codetune-datasets"]
    for path, bad in [
        (("spec", "triggers", 0, "metadata", "lagThreshold"), 16),  # YAML number: KEDA wants "16"
        (("spec", "minReplicas"), 0),  # HPA's name, not KEDA's minReplicaCount
        (("spec", "triggers", 0, "metadata", "consumerName"), "x"),  # not a nats-jetstream parameter
        (("spec", "cooldownPeriod"), -1),
    ]:
        doc = copy.deepcopy(scaled)
        node = doc
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = bad
        assert keda_errors(doc), path
    doc = copy.deepcopy(scaled)
    del doc["spec"]["triggers"][0]["metadata"]["consumer"]
    assert keda_errors(doc)


def test_every_stage_scales_on_the_lag_of_exactly_its_own_durable_consumers() -> None:
    from events.streams import EVENTS

    deployments, scaled = by_kind("Deployment"), by_kind("ScaledObject")
    assert set().union(*(stage_consumers(s) for s in STAGES)) == {c.durable for c in CONSUMERS}
    assert {f"codetune-{s}" for s in STAGES} <= set(deployments), "every stage has a Deployment"
    for stage in SCALED:
        so = scaled[f"codetune-{stage}"]
        assert so["spec"]["scaleTargetRef"]["name"] in deployments
        triggers = so["spec"]["triggers"]
        assert all(t["type"] == "nats-jetstream" for t in triggers)
        assert {t["metadata"]["consumer"] for t in triggers} == stage_consumers(stage), stage
        assert {t["metadata"]["stream"] for t in triggers} == {EVENTS.name}
        assert {t["metadata"]["account"] for t in triggers} == {"$G"}  # plain users of the global account
        assert "replicas" not in deployments[f"codetune-{stage}"]["spec"], "the ScaledObject owns the count"
    assert "codetune-bridge" not in scaled  # the HTTP bridge stays up
    assert ALWAYS_ON == ["ollama"]
    for stage in ALWAYS_ON:  # KEDA would see no lag and keep it at zero: "no responders"
        assert f"codetune-{stage}" not in scaled
        assert deployments[f"codetune-{stage}"]["spec"]["replicas"] >= 1
    # the scaler reads the NATS monitoring port through the Service
    endpoint = {t["metadata"]["natsServerMonitoringEndpoint"] for so in scaled.values() for t in so["spec"]["triggers"]}
    assert endpoint == {"nats.codetune.svc:8222"}
    service = by_kind("Service")["nats"]
    assert 8222 in {p["port"] for p in service["spec"]["ports"]}


def test_scale_to_zero_where_nothing_waits_on_an_answer_and_a_job_long_cool_down_for_gpus() -> None:
    scaled = by_kind("ScaledObject")
    minimum = {s: scaled[f"codetune-{s}"]["spec"].get("minReplicaCount", 0) for s in SCALED}
    assert {s for s, n in minimum.items() if n == 0} == {"datasets", "models", "tuning", "export", "serving"}
    assert minimum["serving"] == 0  # only `model.exported`: the ollama.* requests are the ollama stage's
    assert minimum["intake"] == 1  # a client waits for intake's `queued` record
    tuning = scaled["codetune-tuning"]["spec"]
    assert tuning["cooldownPeriod"] >= 1800
    scale_down = tuning["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]
    assert scale_down["stabilizationWindowSeconds"] >= 1800
    assert all(t["metadata"]["lagThreshold"] == "1" for t in tuning["triggers"])  # one job per GPU worker


def test_each_stage_runs_its_own_image_built_with_its_own_extra() -> None:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    containerfile = (ROOT / "infra" / "deploy" / "Containerfile").read_text()
    assert 'ARG EXTRA=' in containerfile and '".[$EXTRA]"' in containerfile
    images = {}
    for _, doc in documents():
        for c in doc.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
            images[doc["metadata"]["name"]] = c["image"]
    for stage in STAGES:
        image = IMAGE_OF.get(stage, stage)
        assert images[f"codetune-{stage}"] == f"codetune-{image}:0.1.0"
        assert image in extras
    assert images["codetune-bridge"] == "codetune-bridge:0.1.0" and "bridge" in extras
    assert images["codetune-provision"] == "codetune-base:0.1.0"
    # the light stages' extras carry no training stack
    for stage in ("datasets", "intake", "models", "serving", "bridge"):
        assert not any(r.split("[")[0].startswith(("torch", "transformers", "codetune")) for r in extras[stage]), stage


def test_nats_is_a_cluster_that_every_process_lists_and_that_survives_losing_one_pod() -> None:
    from core.settings import Settings

    nats = by_kind("StatefulSet")["nats"]["spec"]
    pods = [f"nats-{i}.nats.codetune.svc" for i in range(nats["replicas"])]
    assert nats["replicas"] == 3 and nats["podManagementPolicy"] == "Parallel"
    container = nats["template"]["spec"]["containers"][0]
    routes = container["args"][container["args"].index("--routes") + 1].split(",")
    assert routes == [f"nats://route:$(CODETUNE_NATS_ROUTE_PASSWORD)@{p}:6222" for p in pods]
    assert "CODETUNE_NATS_ROUTE_PASSWORD" in {e["name"] for e in container["env"]}
    assert "authorization { user: route, password: $CODETUNE_NATS_ROUTE_PASSWORD }" in (
        by_kind("ConfigMap")["codetune-nats-config"]["data"]["nats.conf"])
    service = by_kind("Service")["nats"]["spec"]
    assert service["clusterIP"] == "None" and service["publishNotReadyAddresses"] is True
    assert by_kind("PodDisruptionBudget")["nats"]["spec"]["maxUnavailable"] == 1
    # the processes' settings, as the ConfigMap sets them: every pod, and streams replicated on all three
    config = by_kind("ConfigMap")["codetune-config"]["data"]
    s = Settings(_env_file=None, nats_url=config["CODETUNE_NATS_URL"], nats_replicas=config["CODETUNE_NATS_REPLICAS"])
    assert s.nats_servers == [f"nats://{p}:4222" for p in pods] and s.nats_replicas == nats["replicas"]
    assert "replicaSet=" in config["MONGODB_URI"] and config["MONGODB_URI"].count("mongo-") == 3
