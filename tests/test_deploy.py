"""deploy/: every YAML parses, manifests have their required fields, and image,
entrypoint and resources agree with each other and with the code's config."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from learner.config import load_config

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def load(name):
    return yaml.safe_load((DEPLOY / name).read_text())


def image_tag() -> str:
    """The tag the Dockerfile's header tells users to build."""
    m = re.search(r"-t (\S+) \.", (DEPLOY / "Dockerfile").read_text())
    assert m, "Dockerfile header shows no build command with -t"
    return m.group(1)


def test_every_yaml_parses():
    files = sorted(DEPLOY.rglob("*.yaml"))
    assert len(files) >= 5
    for f in files:
        assert yaml.safe_load(f.read_text()) is not None, f


def test_fleetrl_configs_load():
    for name in ("default.yaml", "cluster.yaml", "smollm2.yaml", "smollm2-vllm.yaml", "smollm2-multiply.yaml"):
        load_config(DEPLOY / name)


def test_dockerfile_installs_the_project_with_pinned_torch():
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^FROM \$\{BASE_IMAGE\}", text, re.M) and "ARG BASE_IMAGE=rayproject/ray:" in text
    assert 'pip install --no-cache-dir "torch==${TORCH_VERSION}"' in text and "pip install --no-cache-dir -e ." in text
    for pkg in ("actors", "learner", "protos", "deploy"):
        assert f"COPY --chown=ray:users {pkg} {pkg}" in text


def _pod_specs(spec: dict):
    yield "head", spec["headGroupSpec"]
    for group in spec["workerGroupSpecs"]:
        yield group["groupName"], group


def _group_resources(group: dict) -> dict:
    raw = group.get("rayStartParams", {}).get("resources")
    return json.loads(yaml.safe_load(raw)) if raw else {}


@pytest.mark.parametrize("name, kind", [("kuberay/raycluster.yaml", "RayCluster"), ("kuberay/rayjob.yaml", "RayJob")])
def test_kuberay_manifests(name, kind):
    doc = load(name)
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == kind and doc["metadata"]["name"]
    spec = doc["spec"] if kind == "RayCluster" else doc["spec"]["rayClusterSpec"]
    cluster = load_config(DEPLOY / "cluster.yaml")
    offered: dict[str, float] = {}
    for group_name, group in _pod_specs(spec):
        (container,) = group["template"]["spec"]["containers"]
        assert container["image"] == image_tag(), f"{name}:{group_name} runs {container['image']}"
        assert container["resources"]["requests"]["cpu"] == group["rayStartParams"]["num-cpus"]
        for k, v in _group_resources(group).items():
            offered[k] = offered.get(k, 0) + v * group.get("maxReplicas", group.get("replicas", 1))
    for key, per_worker in cluster.rollout.resources.items():  # the rollout workers fit somewhere
        assert offered.get(key, 0) >= per_worker * cluster.rollout.num_workers, (key, offered)
    if kind == "RayJob":
        argv = shlex.split(doc["spec"]["entrypoint"])
        assert argv[:2] == ["fleetrl", "train"]
        load_config(DEPLOY.parent / argv[2])  # the config it names exists and is valid


def test_cluster_launcher():
    doc = load("ray-cluster-launcher.yaml")
    for key in ("cluster_name", "provider", "available_node_types", "head_node_type"):
        assert key in doc
    assert doc["docker"]["image"] == image_tag()
    assert doc["head_node_type"] in doc["available_node_types"]
    cluster = load_config(DEPLOY / "cluster.yaml")
    capacity = {}
    for node in doc["available_node_types"].values():
        for k, v in node["resources"].items():
            capacity[k] = capacity.get(k, 0) + v * node.get("max_workers", 1)
    for key, per_worker in cluster.rollout.resources.items():
        assert capacity.get(key, 0) >= per_worker * cluster.rollout.num_workers
