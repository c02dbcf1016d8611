"""Minimal, valid Kubernetes workloads of every kind the injector knows (test data)."""

from __future__ import annotations

import copy

import yaml

POD_TEMPLATE = {
    "metadata": {"labels": {"app": "web"}},
    "spec": {"containers": [{"name": "app", "image": "registry.example/app:1.0",
                             "ports": [{"containerPort": 8080}]}]},
}


def workload(kind: str, *, namespace: str | None = None, template: dict | None = None) -> dict:
    """A minimal valid object of each workload kind, its pod template at the right depth."""
    template = copy.deepcopy(template or POD_TEMPLATE)
    meta = {"name": kind.lower()}
    if namespace:
        meta["namespace"] = namespace
    selector = {"matchLabels": {"app": "web"}}
    if kind == "Pod":
        return {"apiVersion": "v1", "kind": "Pod", "metadata": {**meta, **template["metadata"]},
                "spec": template["spec"]}
    if kind in ("Job", "CronJob"):
        template["spec"]["restartPolicy"] = "Never"
    spec = {
        "ReplicationController": {"selector": {"app": "web"}, "template": template},
        "Deployment": {"selector": selector, "template": template},
        "StatefulSet": {"selector": selector, "serviceName": "web", "template": template},
        "DaemonSet": {"selector": selector, "template": template},
        "ReplicaSet": {"selector": selector, "template": template},
        "Job": {"template": template},
        "CronJob": {"schedule": "*/5 * * * *", "jobTemplate": {"spec": {"template": template}}},
    }[kind]
    api = {"ReplicationController": "v1", "Job": "batch/v1", "CronJob": "batch/v1"}.get(kind, "apps/v1")
    return {"apiVersion": api, "kind": kind, "metadata": meta, "spec": spec}


KINDS = ("Pod", "ReplicationController", "Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job", "CronJob")


def dump(*objects: dict) -> str:
    return "".join("---\n" + yaml.safe_dump(o, sort_keys=False) for o in objects)


def template_copy() -> dict:
    return copy.deepcopy(POD_TEMPLATE)
