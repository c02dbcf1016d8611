"""`sidecar-proxy inject`: add the init step and the proxy to Kubernetes workloads.

Like `istioctl kube-inject`: Kubernetes YAML in (files, or `-f -` for stdin,
several documents each), the same YAML out on stdout with every workload's
pod template carrying the two containers that `sidecar.py` describes.

What happens to each document:

- Pod, ReplicationController, Deployment, StatefulSet, DaemonSet,
  ReplicaSet, Job, CronJob: injected, unless one of these holds, in which
  case it is written unchanged and stderr says why, naming the document:
  its namespace is kube-system (the design note's special case: cluster
  components such as DNS or ingress controllers are left alone); the
  annotation `sidecar-proxy/inject: "false"` is on the workload, its pod
  template, or a Namespace document of the same input; it is already
  injected (`sidecar-proxy/status` or one of our container names), so
  inject(inject(x)) == inject(x); it uses hostNetwork (the redirect would
  capture the node's own traffic).
- `kind: List`: each item as above.
- Any other kind (Service, ConfigMap, CRDs...): written unchanged.
- Not a mapping, or no apiVersion/kind, or a workload whose pod spec cannot
  take the sidecar (see `sidecar.conflicts`): an error.

Errors: one line on stderr (`app.yaml: document 2 (Deployment web): ...`),
exit status 2, and nothing on stdout: every document is rendered before the
first byte is written, so a pipe into `kubectl apply` never gets half a file.
"""

from __future__ import annotations

import argparse
import copy
import sys
from dataclasses import dataclass, field, replace
from typing import Any

from ..exitcodes import EXIT_OK, EXIT_USAGE
from . import manifests as mf
from . import sidecar
from .manifests import Document, ManifestError

SKIPPED_NAMESPACES = ("kube-system",)
QUIT_URL = f"http://127.0.0.1:{sidecar.ADMIN_PORT}/quitquitquit"


@dataclass
class Rendered:
    """The output objects, in input order, and the notes for stderr."""

    objects: list[Any] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def render(documents: list[Document], options: sidecar.Options, *, native: bool | None = None,
           namespace: str | None = None) -> Rendered:
    """Inject every workload document; pure, raises ManifestError on bad input.

    `native` None means: native sidecar for Jobs and CronJobs (so they can
    complete), classic for the rest. `namespace` stands for documents that
    name none (like kubectl's -n).
    """
    out = Rendered()
    opted_out = opted_out_namespaces(documents)
    for doc in documents:
        obj, note = inject_document(doc, options, native=native, namespace=namespace, opted_out=opted_out)
        out.objects.append(obj)
        if note:
            out.notes.append(f"{doc.where}: {note}")
    return out


def opted_out_namespaces(documents: list[Document]) -> set[str]:
    """Namespaces that the input itself annotates `sidecar-proxy/inject: "false"`."""
    names = set()
    for doc in documents:
        obj = doc.data
        if obj["kind"] == "Namespace" and mf.api_group(obj["apiVersion"]) == "":
            meta = obj.get("metadata") or {}
            if _opts_out(meta) and meta.get("name"):
                names.add(meta["name"])
    return names


def _opts_out(meta: Any) -> bool:
    annotations = meta.get("annotations") if isinstance(meta, dict) else None
    value = annotations.get(sidecar.INJECT_ANNOTATION) if isinstance(annotations, dict) else None
    return value is not None and str(value).lower() == "false"


def _peek(obj: Any, path: tuple[str, ...]) -> Any:
    """The value at `path`, or None; never creates anything (skipped documents stay untouched)."""
    for key in path:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(key)
    return obj


def inject_document(doc: Document, options: sidecar.Options, *, native: bool | None, namespace: str | None,
                    opted_out: set[str]) -> tuple[Any, str | None]:
    """(object to write, note for stderr or None) for one document."""
    obj = doc.data
    spec_path = mf.pod_spec_path(obj)
    if spec_path is None:
        if obj["kind"] in mf.WORKLOAD_KINDS:
            return obj, (f"not injected: {obj['apiVersion']} is not an API group this tool knows for "
                         f"{obj['kind']} (it knows {_known_groups(obj['kind'])})")
        return obj, None
    meta_path = spec_path[:-1] + ("metadata",)
    ns = _peek(obj, ("metadata", "namespace")) or namespace
    if ns in SKIPPED_NAMESPACES:
        return obj, f"not injected: namespace {ns} is left alone (cluster components)"
    if ns in opted_out:
        return obj, f'not injected: namespace {ns} has annotation {sidecar.INJECT_ANNOTATION}: "false"'
    if _opts_out(obj.get("metadata")):
        return obj, f'not injected: annotation {sidecar.INJECT_ANNOTATION}: "false" on the {obj["kind"]}'
    if _opts_out(_peek(obj, meta_path)):
        return obj, f'not injected: annotation {sidecar.INJECT_ANNOTATION}: "false" on the pod template'

    spec = check_pod_spec(doc, spec_path)
    pod_meta = _peek(obj, meta_path) or {}
    if not isinstance(pod_meta, dict):
        raise doc.error(f"{'.'.join(meta_path)}: expected a mapping, got {type(pod_meta).__name__}")
    if sidecar.already_injected(spec, pod_meta):
        return obj, f"already injected ({sidecar.STATUS_ANNOTATION} or a {sidecar.PROXY_NAME} container), left as it is"
    if spec.get("hostNetwork") is True:
        return obj, ("not injected: hostNetwork pods use the node's network; "
                     "the redirect would capture the node's traffic")

    native = obj["kind"] in mf.RUN_TO_COMPLETION if native is None else native
    options = replace(options, native=native)
    mode = (pod_meta.get("annotations") or {}).get(sidecar.INTERCEPTION_ANNOTATION)
    if mode is not None:  # Istio's per-pod choice wins over --interception-mode
        if mode not in sidecar.INTERCEPTION_MODES:
            raise doc.error(f"{'.'.join(meta_path)}.annotations.{sidecar.INTERCEPTION_ANNOTATION}: {mode!r} is not "
                            f"one of {', '.join(sidecar.INTERCEPTION_MODES)}")
        options = replace(options, interception=mode)
    base = ".".join(spec_path)
    problems = sidecar.conflicts(spec, options)
    if problems:
        where, problem = problems[0]
        raise doc.error(f"{base}.{where}: {problem}")

    new_spec, new_meta = sidecar.inject(spec, pod_meta, options)
    out = copy.deepcopy(obj)
    parent = out
    for key in spec_path[:-1]:
        parent = parent[key]
    parent[spec_path[-1]] = new_spec
    if "metadata" not in parent:  # none before: put it just above the spec, where people look
        items = list(parent.items())
        at = [k for k, _ in items].index(spec_path[-1])
        parent.clear()
        parent.update(items[:at] + [("metadata", new_meta)] + items[at:])
    parent["metadata"] = new_meta
    note = None
    if obj["kind"] in mf.RUN_TO_COMPLETION and not native:
        note = (f"classic sidecar in a {obj['kind']}: its pods complete only when the app ends the proxy "
                f"with POST {QUIT_URL} (or use --native-sidecar, Kubernetes 1.29+)")
    return out, note


def _known_groups(kind: str) -> str:
    return ", ".join(f"{group or 'core'}" for group, k in mf.POD_SPEC_PATHS if k == kind)


def check_pod_spec(doc: Document, spec_path: tuple[str, ...]) -> dict:
    """The pod spec, checked only as far as injecting needs (the API server checks the rest)."""
    spec = mf.lookup(doc, spec_path)
    base = ".".join(spec_path)
    containers = spec.get("containers")
    if not isinstance(containers, list) or not containers:
        raise doc.error(f"{base}.containers: expected a non-empty list of containers")
    for name in ("containers", "initContainers", "volumes"):
        value = spec.get(name)
        if value is None:
            continue
        if not isinstance(value, list):
            raise doc.error(f"{base}.{name}: expected a list, got {type(value).__name__}")
        for i, item in enumerate(value):
            if not isinstance(item, dict):
                raise doc.error(f"{base}.{name}[{i}]: expected a mapping, got {type(item).__name__}")
    return spec


# --- the command: I/O at the edge ----------------------------------------------------

def read_source(path: str) -> tuple[str, str]:
    """(text, name for messages) of a file, or of stdin for `-`."""
    if path == "-":
        return sys.stdin.read(), "<stdin>"
    try:
        with open(path, encoding="utf-8") as f:
            return f.read(), path
    except OSError as exc:
        raise ManifestError(f"{path}: cannot read: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ManifestError(f"{path}: not UTF-8 text") from None


def cmd_inject(args: argparse.Namespace) -> int:
    options = sidecar.Options(
        method=args.method, image=args.image, init_image=args.init_image, proxy_uid=args.proxy_uid,
        cgroup_root=args.cgroup_root, services_configmap=args.services_configmap, validation=args.validation,
        interception=args.interception_mode,
    )
    if args.filename.count("-") > 1:
        print("sidecar-proxy inject: -f - (stdin) can be given once", file=sys.stderr)
        return EXIT_USAGE
    try:
        documents: list[Document] = []
        for path in args.filename:
            text, name = read_source(path)
            documents.extend(mf.parse_stream(text, name))
        result = render(documents, options, native=args.native_sidecar, namespace=args.namespace)
        text = mf.dump_stream(result.objects)
    except ManifestError as exc:
        print(f"sidecar-proxy inject: {exc}", file=sys.stderr)
        return EXIT_USAGE
    for note in result.notes:
        print(f"sidecar-proxy inject: {note}", file=sys.stderr)
    sys.stdout.write(text)
    return EXIT_OK


def _uid(value: str) -> int:
    try:
        uid = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a UID") from None
    if not 0 < uid < 2**31:
        raise argparse.ArgumentTypeError(f"{uid} is not a UID for the proxy (1-2147483647; 0 is root)")
    return uid


def add_parser(sub) -> None:
    parser = sub.add_parser(
        "inject", help="add the init step and the proxy to Kubernetes workloads (YAML in, YAML out)",
        description="Reads Kubernetes YAML and writes it to stdout with the iptables init container and "
                    "the proxy added to every workload's pod template. Other documents pass through.",
    )
    parser.add_argument("-f", "--filename", action="append", required=True, metavar="FILE",
                        help="YAML file; - reads stdin; may be repeated")
    parser.add_argument("--method", choices=sidecar.METHODS, default="uid",
                        help="how the proxy's own traffic escapes the redirect (default uid)")
    parser.add_argument("--image", default=sidecar.DEFAULT_IMAGE,
                        help=f"proxy image (default {sidecar.DEFAULT_IMAGE})")
    parser.add_argument("--init-image", default=sidecar.DEFAULT_INIT_IMAGE,
                        help=f"init step image (default {sidecar.DEFAULT_INIT_IMAGE})")
    parser.add_argument("--native-sidecar", action=argparse.BooleanOptionalAction, default=None,
                        help="run the proxy as a Kubernetes 1.29+ native sidecar (an init container with "
                             "restartPolicy Always); default: yes for Jobs and CronJobs, no otherwise")
    parser.add_argument("--validation", action=argparse.BooleanOptionalAction, default=True,
                        help="a validation init container after the init step: validate.sh checks that the "
                             "redirect works before the app starts, and stops the pod (exit 126) if not "
                             "(default: yes)")
    parser.add_argument("--interception-mode", choices=sidecar.INTERCEPTION_MODES, default="REDIRECT",
                        help="how inbound connections reach the proxy: REDIRECT (the app sees the pod's "
                             "address), or TPROXY (the app sees the client's; the proxy then runs as UID 0 "
                             "with NET_ADMIN). A pod's annotation "
                             f"{sidecar.INTERCEPTION_ANNOTATION} wins (default REDIRECT)")
    parser.add_argument("-n", "--namespace", metavar="NS",
                        help="namespace of documents that name none (as with kubectl -n)")
    parser.add_argument("--proxy-uid", type=_uid, default=sidecar.PROXY_UID, metavar="UID",
                        help=f"UID of the proxy (ISTIO_PROXY_UID; default {sidecar.PROXY_UID})")
    parser.add_argument("--cgroup-root", default=sidecar.CGROUP_ROOT, metavar="DIR",
                        help=f"cgroup method: the node's net_cls hierarchy (default {sidecar.CGROUP_ROOT})")
    parser.add_argument("--services-configmap", default=sidecar.SERVICES_CONFIGMAP, metavar="NAME",
                        help="explicit method: ConfigMap whose key 'services' is the output of "
                             f"`sidecar-proxy services` (default {sidecar.SERVICES_CONFIGMAP})")
    parser.set_defaults(func=cmd_inject)
