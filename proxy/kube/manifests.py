"""Kubernetes YAML as data: documents in a stream, workload kinds, pod templates.

Pure functions over parsed YAML. Reading files and writing stdout belong to
`inject.py`; what the sidecar looks like belongs to `sidecar.py`.

Every problem is a `ManifestError` whose text names the culprit the way a
person would look for it: `app.yaml: document 2 (Deployment web):
spec.template.spec.containers: expected a list, got dict`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import yaml

from ..config import ConfigError, Limits, parse_yaml_stream

# Where each workload kind keeps its pod spec, by (API group, kind). The
# group matters: a CRD may call itself "Deployment" in another group, and
# its pod template (if any) is not ours to change.
POD_SPEC_PATHS: dict[tuple[str, str], tuple[str, ...]] = {
    ("", "Pod"): ("spec",),
    ("", "ReplicationController"): ("spec", "template", "spec"),
    ("apps", "Deployment"): ("spec", "template", "spec"),
    ("apps", "StatefulSet"): ("spec", "template", "spec"),
    ("apps", "DaemonSet"): ("spec", "template", "spec"),
    ("apps", "ReplicaSet"): ("spec", "template", "spec"),
    ("batch", "Job"): ("spec", "template", "spec"),
    ("batch", "CronJob"): ("spec", "jobTemplate", "spec", "template", "spec"),
}
WORKLOAD_KINDS = frozenset(kind for _, kind in POD_SPEC_PATHS)

# Kinds whose pods run to completion: a classic sidecar would keep them running.
RUN_TO_COMPLETION = frozenset({"Job", "CronJob"})


class ManifestError(Exception):
    """Input that cannot be used; str() is the one line for stderr."""


@dataclass
class Document:
    """One object of the input and where it came from (for messages)."""

    source: str  # file name, or <stdin>
    index: int  # 1-based position in its file
    data: Any
    item: int | None = None  # 1-based position inside a kind: List

    @property
    def where(self) -> str:
        """`app.yaml: document 2 (Deployment shop/web)` once it is known to be an object."""
        place = f"{self.source}: document {self.index}"
        if self.item is not None:
            place += f" item {self.item}"
        if isinstance(self.data, dict) and isinstance(self.data.get("kind"), str):
            place += f" ({self.data['kind']} {display_name(self.data)})"
        return place

    def error(self, message: str) -> ManifestError:
        return ManifestError(f"{self.where}: {message}")


def display_name(obj: dict) -> str:
    meta = obj["metadata"] if isinstance(obj.get("metadata"), dict) else {}
    name = meta.get("name") or meta.get("generateName") or "<unnamed>"
    return f"{meta['namespace']}/{name}" if meta.get("namespace") else str(name)


# --- reading and writing the stream -------------------------------------------------

# Manifests may be long (`kubectl get -o yaml` of a namespace) and Kubernetes
# objects deep (a CRD's schema); aliases are expanded and counted all the same.
LIMITS = Limits(max_bytes=16 << 20, max_depth=100, max_values=1_000_000)

class _Loader(yaml.SafeLoader):
    """SafeLoader that keeps timestamps as the strings they were.

    PyYAML turns an unquoted 2024-01-01T00:00:00Z into a datetime and would
    write it back in another spelling; Kubernetes sees strings there.
    """


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def parse_stream(text: str, source: str) -> list[Document]:
    """Every non-empty document of a YAML stream, checked to be a Kubernetes object.

    A `kind: List` (what `kubectl get -o yaml` prints) is opened into its items.
    """
    documents: list[Document] = []
    index = 0
    stream = parse_yaml_stream(text, source, LIMITS, loader=_Loader)
    while True:
        index += 1
        try:
            data = next(stream).data
        except StopIteration:
            break
        except ConfigError as exc:  # not YAML, or beyond the limits (too deep, an alias bomb, ...)
            at = f"line {exc.line}: " if exc.line else ""
            invalid = "not valid YAML: "
            problem = (invalid + at + exc.message.removeprefix(invalid) if exc.message.startswith(invalid)
                       else at + exc.message)
            raise ManifestError(f"{source}: document {index}: {problem}") from None
        if data is None:  # an empty document, e.g. a trailing ---
            continue
        doc = Document(source, index, data)
        check_object(doc)
        if data["kind"] == "List" and "items" in data:
            items = data["items"]
            if not isinstance(items, list):
                raise doc.error(f"items: expected a list, got {type(items).__name__}")
            for number, item in enumerate(items, start=1):
                inner = Document(source, index, item, item=number)
                check_object(inner)
                documents.append(inner)
        else:
            documents.append(doc)
    return documents


def check_object(doc: Document) -> None:
    """A Kubernetes object is a mapping with string apiVersion and kind."""
    if not isinstance(doc.data, dict):
        raise doc.error(f"not a Kubernetes object (a mapping with apiVersion and kind), got {_type(doc.data)}")
    for key in ("apiVersion", "kind"):
        value = doc.data.get(key)
        if not isinstance(value, str) or not value:
            raise doc.error(f"not a Kubernetes object: no {key}")
    meta = doc.data.get("metadata")
    if meta is not None and not isinstance(meta, dict):
        raise doc.error(f"metadata: expected a mapping, got {_type(meta)}")


class _Dumper(yaml.SafeDumper):
    """Block style; multi-line strings (scripts) as literal blocks, readable in review."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def dump_stream(objects: list[Any]) -> str:
    """Objects as one YAML stream, `---` between documents, keys in their order."""
    return "---\n".join(
        yaml.dump(obj, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=4096)
        for obj in objects
    )


# --- workloads and their pod templates ----------------------------------------------

def api_group(api_version: str) -> str:
    """`apps/v1` -> `apps`; `v1` -> `` (the core group)."""
    return api_version.rpartition("/")[0]


def pod_spec_path(obj: dict) -> tuple[str, ...] | None:
    """Where this object's pod spec is, or None if it is not a workload we inject."""
    return POD_SPEC_PATHS.get((api_group(obj["apiVersion"]), obj["kind"]))


def pod_template_meta_path(obj: dict) -> tuple[str, ...] | None:
    """Where the pod's metadata is: the object's own for a Pod, else the template's."""
    path = pod_spec_path(obj)
    if path is None:
        return None
    return path[:-1] + ("metadata",)


def lookup(doc: Document, path: tuple[str, ...], *, create: bool = False) -> dict:
    """The mapping at `path` in the document; a missing step is created or an error."""
    node: Any = doc.data
    walked: list[str] = []
    for key in path:
        walked.append(key)
        child = node.get(key)
        if child is None:
            if not create:
                raise doc.error(f"{'.'.join(walked)}: is required")
            child = node[key] = {}
        if not isinstance(child, dict):
            raise doc.error(f"{'.'.join(walked)}: expected a mapping, got {_type(child)}")
        node = child
    return node


def iter_containers(spec: dict) -> Iterator[tuple[str, dict]]:
    """(field path relative to the pod spec, container) for init and app containers."""
    for field in ("initContainers", "containers"):
        for i, container in enumerate(spec.get(field) or []):
            yield f"{field}[{i}]", container


def _type(value: Any) -> str:
    names: dict[type, str] = {dict: "a mapping", list: "a list", str: "a string"}
    return names.get(type(value), type(value).__name__)
