"""What the injected containers look like, and how they join a pod spec.

Theory of operation. A pod gets three things:

- `sidecar-proxy-init`, a one-shot init container (root, NET_ADMIN, and
  NET_RAW because the iptables-legacy backend opens a raw socket) that runs
  `redirect.sh --method M` (iptables/redirect.sh) once to install the
  redirect in the pod's network namespace, then exits. All privileged work happens here (the design note's
  security requirement).
- `sidecar-proxy-validation`, a second one-shot init container from the same
  image, right after it: `validate.sh` with the same arguments sends real
  connections through the rules (an app's must reach the proxy port, the
  proxy's must not) and exits 0, or 126 naming what is wrong, which stops
  the pod before the app starts (Istio's istio-validation). Root too, to
  dial as the proxy's UID (SETUID, SETGID), read the rules (NET_ADMIN,
  NET_RAW), hand its listener's file to that UID (CHOWN) and stop it (KILL).
  `inject --no-validation` leaves it out.
- `sidecar-proxy`, the proxy: UID 1337, no capabilities, read-only root file
  system. The mark method is the exception: SO_MARK needs CAP_NET_ADMIN in the
  proxy, and Kubernetes cannot give a capability to a non-root container
  (it sets no ambient capabilities: kubernetes/kubernetes#56374, KEP-2763),
  so that variant runs as UID 0 with NET_ADMIN as its only capability.

Inbound interception by TPROXY (`inject --interception-mode TPROXY`, or
Istio's pod annotation `sidecar.istio.io/interceptionMode: TPROXY`): the
app sees its clients' addresses (iptables/README.md, "Inbound by TPROXY").
Both containers get INBOUND_INTERCEPTION_MODE=TPROXY, which redirect.sh and
the proxy read. IP_TRANSPARENT needs CAP_NET_ADMIN, so the proxy runs as
UID 0 with NET_ADMIN alone, in group 1337 (the proxy's UID), as Istio's
TPROXY sidecar does (its injection template,
manifests/charts/istio-control/istio-discovery/files/injection-template.yaml:
runAsUser 0, runAsGroup 1337, NET_ADMIN added and ALL dropped). With the uid
method the rules then also bypass that group (SIDECAR_PROXY_GID), since the
UID no longer names the proxy.

Two ways to place the proxy:

- classic: first of `containers`, with a postStart hook that waits for
  /ready (the kubelet starts the next container only when it returns), and a
  preStop pause so it keeps serving while the app shuts down. A Job's pod
  never completes this way unless the app ends the proxy with
  `POST http://127.0.0.1:15000/quitquitquit`.
- native (Kubernetes 1.29+): an init container with `restartPolicy: Always`
  placed right after the init step. Its startupProbe gates the rest of the
  pod (no app-before-proxy race) and the kubelet stops it after the app
  containers exit, so Jobs complete.

The design note's variables go into both containers with the same values,
each only where its method uses it (ISTIO_SO_MARK in the proxy's
environment turns marking on, config.py, so it must be absent elsewhere).
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass

from .. import __version__
from ..config import DEFAULT_ADMIN_PORT, DEFAULT_MARK, DEFAULT_PORT, NET_CLS_ID, PROXY_UID
from ..config.methods import METHODS

INIT_NAME = "sidecar-proxy-init"
VALIDATION_NAME = "sidecar-proxy-validation"
PROXY_NAME = "sidecar-proxy"
# where the init image keeps the scripts (the Dockerfile's init stage)
INIT_SCRIPTS = "/usr/local/lib/sidecar-proxy/iptables"
STATUS_ANNOTATION = "sidecar-proxy/status"
INJECT_ANNOTATION = "sidecar-proxy/inject"
DEFAULT_CONTAINER_ANNOTATION = "kubectl.kubernetes.io/default-container"
INTERCEPTION_ANNOTATION = "sidecar.istio.io/interceptionMode"  # Istio's, per pod
INTERCEPTION_MODES = ("REDIRECT", "TPROXY")

DEFAULT_IMAGE = f"sidecar-proxy:{__version__}"
DEFAULT_INIT_IMAGE = f"sidecar-proxy-init:{__version__}"

ADMIN_PORT = DEFAULT_ADMIN_PORT

# Before SIGTERM starts the proxy's drain (5s by default), keep serving while
# the app finishes: preStop pause + drain stay inside the default 30s grace.
PRESTOP_PAUSE_SECONDS = 5
READY_WAIT_SECONDS = 60

CGROUP_ROOT = "/sys/fs/cgroup/net_cls"  # on the node (cgroup v1)
CGROUP_MOUNT = "/run/sidecar-proxy/net_cls"  # in both containers
SERVICES_CONFIGMAP = "sidecar-proxy-services"
SERVICES_MOUNT = "/etc/sidecar-proxy"
PROXY_CONFIG_KEY = "proxy.yaml"  # explicit: the ConfigMap holds the proxy's config and its services file

READY_URL = f"http://127.0.0.1:{ADMIN_PORT}/ready"
# The probes run in the proxy's container and ask the admin API on loopback:
# the admin port is never exposed to the network (its /quitquitquit ends the
# proxy), and the probe does not depend on the redirect. urlopen raises on
# anything but 2xx, so the exit status is the answer.
READY_CHECK = f"import urllib.request; urllib.request.urlopen({READY_URL!r}, timeout=2)"
READY_WAIT = f"""\
import time, urllib.request
deadline = time.monotonic() + {READY_WAIT_SECONDS}
while True:
    try:
        urllib.request.urlopen({READY_URL!r}, timeout=1)
        break
    except OSError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.25)
"""


@dataclass(frozen=True)
class Options:
    """Everything that decides the injected containers."""

    method: str = "uid"
    image: str = DEFAULT_IMAGE
    init_image: str = DEFAULT_INIT_IMAGE
    native: bool = False
    proxy_uid: int = PROXY_UID
    cgroup_root: str = CGROUP_ROOT
    services_configmap: str = SERVICES_CONFIGMAP
    validation: bool = True  # the validation init container after the init step
    interception: str = "REDIRECT"  # how inbound reaches the proxy: REDIRECT or TPROXY (Istio's names)

    @property
    def tproxy(self) -> bool:
        return self.interception == "TPROXY"


def design_env(options: Options) -> list[dict]:
    """The note's variables for this method, identical in both containers."""
    values = {"ISTIO_PROXY_UID": str(options.proxy_uid), "ISTIO_SO_MARK": f"{DEFAULT_MARK:#x}",
              "ISTIO_NET_CLS_ID": f"{NET_CLS_ID:#x}"}
    env: list[dict] = [{"name": "ISTIO_PROXY_PORT", "value": str(DEFAULT_PORT)}]
    env += [{"name": name, "value": values[name]} for name in METHODS[options.method].variables]
    if options.method == "cgroup":
        # The pod's own cgroup directory, named by the pod's UID so pods on
        # one node never share one; $(POD_UID) in args expands to it.
        env.append({"name": "POD_UID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.uid"}}})
    if options.tproxy:
        env.append({"name": "INBOUND_INTERCEPTION_MODE", "value": "TPROXY"})
        if options.method == "uid":  # the proxy runs as UID 0 in group proxy_uid: bypass the group
            env.append({"name": "SIDECAR_PROXY_GID", "value": str(options.proxy_uid)})
    return env


def cgroup_dir() -> str:
    return f"{CGROUP_MOUNT}/sidecar-proxy-$(POD_UID)"


def init_args(options: Options) -> list[str]:
    """redirect.sh's arguments, which validate.sh takes too."""
    args = ["--method", options.method]
    if options.method == "cgroup":
        args += ["--cgroup-dir", cgroup_dir()]
    if options.method == "explicit":
        args += ["--services", f"{SERVICES_MOUNT}/services"]
    return args


def init_mounts(options: Options) -> list[dict]:
    mounts: list[dict] = [
        # Writable scratch under a read-only root: iptables-legacy takes its
        # lock in /run; /tmp for a shell that keeps here-documents there (and
        # validate.sh's listener its notes).
        {"name": "sidecar-proxy-init-scratch", "mountPath": "/run", "subPath": "run"},
        {"name": "sidecar-proxy-init-scratch", "mountPath": "/tmp", "subPath": "tmp"},
    ]
    if options.method == "cgroup":
        mounts.append({"name": "sidecar-proxy-cgroup", "mountPath": CGROUP_MOUNT})
    if options.method == "explicit":
        mounts.append({"name": "sidecar-proxy-services", "mountPath": SERVICES_MOUNT, "readOnly": True})
    return mounts


def root_security_context(capabilities: list[str]) -> dict:
    """A one-shot container of the init image: root with these capabilities only."""
    return {
        "runAsUser": 0,
        "runAsGroup": 0,
        "runAsNonRoot": False,
        "privileged": False,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"], "add": capabilities},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def validation_container(options: Options) -> dict:
    """validate.sh, from the init image, with the init step's arguments."""
    return {
        "name": VALIDATION_NAME,
        "image": options.init_image,
        "command": ["/bin/sh", f"{INIT_SCRIPTS}/validate.sh"],
        "args": init_args(options),
        "env": design_env(options),
        # NET_ADMIN, NET_RAW: read the rules (and, for the mark method, mark
        # the probe); SETUID, SETGID: dial and listen as the proxy's UID;
        # CHOWN: give that listener its file; KILL: stop it (another UID's)
        "securityContext": root_security_context(["NET_ADMIN", "NET_RAW", "SETUID", "SETGID", "CHOWN", "KILL"]),
        "volumeMounts": init_mounts(options),
    }


def init_container(options: Options) -> dict:
    capabilities = ["NET_ADMIN", "NET_RAW"]
    if options.method == "cgroup":
        # redirect.sh hands the new cgroup's tasks/cgroup.procs to the
        # proxy's UID: chown to another owner needs CAP_CHOWN, even for root.
        # And it creates the cgroup in the hierarchy's root, which the kernel
        # makes dr-xr-xr-x: without CAP_DAC_OVERRIDE, root gets EACCES there
        # (found by tests/e2e/test_pods.py, in a real pod).
        capabilities += ["CHOWN", "DAC_OVERRIDE"]
    return {
        "name": INIT_NAME,
        "image": options.init_image,
        "args": init_args(options),
        "env": design_env(options),
        "securityContext": root_security_context(capabilities),
        "volumeMounts": init_mounts(options),
    }


def proxy_security_context(options: Options) -> dict:
    needed = list(METHODS[options.method].proxy_capabilities)
    if options.tproxy and "NET_ADMIN" not in needed:
        needed.append("NET_ADMIN")  # IP_TRANSPARENT
    if needed:
        # SO_MARK and IP_TRANSPARENT need CAP_NET_ADMIN; Kubernetes gives capabilities
        # to UID 0 only (see the module docstring). Nothing else of root's is kept.
        group = options.proxy_uid if options.tproxy else 0
        identity = {"runAsUser": 0, "runAsGroup": group, "runAsNonRoot": False}
        capabilities = {"drop": ["ALL"], "add": needed}
    else:
        identity = {"runAsUser": options.proxy_uid, "runAsGroup": options.proxy_uid, "runAsNonRoot": True}
        capabilities = {"drop": ["ALL"]}
    return {
        **identity,
        "privileged": False,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": capabilities,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _probe(**timing: int) -> dict:
    return {"exec": {"command": ["python", "-c", READY_CHECK]}, "timeoutSeconds": 3, **timing}


def proxy_container(options: Options) -> dict:
    args = ["run"]
    mounts: list[dict] = []
    if options.method == "mark":
        args += ["--mark", "$(ISTIO_SO_MARK)"]
    if options.method == "cgroup":
        args += ["--cgroup", cgroup_dir()]
        mounts.append({"name": "sidecar-proxy-cgroup", "mountPath": CGROUP_MOUNT})
    if options.method == "explicit":
        # The chains that send the listed services to their clusters: with no
        # bypass rule, a proxy that dialled a listed address itself would be
        # captured again. The services file beside it is made from it.
        args += ["--config", f"{SERVICES_MOUNT}/{PROXY_CONFIG_KEY}"]
        mounts.append({"name": "sidecar-proxy-services", "mountPath": SERVICES_MOUNT, "readOnly": True})
    container = {
        "name": PROXY_NAME,
        "image": options.image,
        "args": args,
        "env": design_env(options),
        "securityContext": proxy_security_context(options),
        "readinessProbe": _probe(periodSeconds=5, failureThreshold=3),
    }
    if mounts:
        container["volumeMounts"] = mounts
    if options.native:
        container["restartPolicy"] = "Always"
        # The kubelet starts the containers after a native sidecar only when
        # its startupProbe has passed: the app never starts before the proxy.
        container["startupProbe"] = _probe(periodSeconds=1, failureThreshold=READY_WAIT_SECONDS)
    else:
        container["lifecycle"] = {
            # The kubelet starts the next container when postStart returns.
            "postStart": {"exec": {"command": ["python", "-c", READY_WAIT]}},
            # Keep serving while the app shuts down; SIGTERM (drain) comes after.
            "preStop": {"exec": {"command": ["sleep", str(PRESTOP_PAUSE_SECONDS)]}},
        }
    return container


def volumes(options: Options) -> list[dict]:
    vols: list[dict] = [{"name": "sidecar-proxy-init-scratch", "emptyDir": {}}]
    if options.method == "cgroup":
        # The node's net_cls hierarchy (cgroup v1 only); see deploy/README.md
        # for what this costs: a hostPath, and a directory left per pod.
        vols.append({"name": "sidecar-proxy-cgroup", "hostPath": {"path": options.cgroup_root, "type": "Directory"}})
    if options.method == "explicit":
        vols.append({"name": "sidecar-proxy-services", "configMap": {"name": options.services_configmap}})
    return vols


def status(options: Options) -> str:
    """The value of the status annotation: what was injected, for people and for idempotence."""
    return json.dumps({
        "version": __version__,
        "method": options.method,
        **({"interceptionMode": options.interception} if options.tproxy else {}),  # REDIRECT: as before
        "nativeSidecar": options.native,
        "initContainers": ([INIT_NAME] + ([VALIDATION_NAME] if options.validation else [])
                           + ([PROXY_NAME] if options.native else [])),
        "containers": [] if options.native else [PROXY_NAME],
        "volumes": [v["name"] for v in volumes(options)],
    }, separators=(",", ":"))


def inject(spec: dict, meta: dict, options: Options) -> tuple[dict, dict]:
    """A new (pod spec, pod metadata) with the init step and the proxy added.

    The caller has decided that this pod is to be injected and that its spec
    is well formed (see `conflicts`). The inputs are not modified.
    """
    spec, meta = copy.deepcopy(spec), copy.deepcopy(meta)
    app_containers = spec.get("containers") or []
    user_inits = spec.get("initContainers") or []
    # the init step, and right after it the check that its redirect works
    init = [init_container(options)] + ([validation_container(options)] if options.validation else [])
    proxy = proxy_container(options)
    if options.native:
        # init step, then the proxy, then the user's init containers: those
        # run with the proxy up, so their traffic is proxied too.
        spec["initContainers"] = init + [proxy] + user_inits
    else:
        # The user's init containers run before the redirect exists (nothing
        # would answer on 5001 yet); the proxy starts before the app.
        spec["initContainers"] = user_inits + init
        spec["containers"] = [proxy] + app_containers
    spec["volumes"] = (spec.get("volumes") or []) + volumes(options)
    spec = _init_containers_first(spec)
    annotations = meta.setdefault("annotations", {}) or {}
    meta["annotations"] = annotations
    annotations[STATUS_ANNOTATION] = status(options)
    if not options.native and app_containers:
        # `kubectl logs/exec` pick the first container unless told otherwise.
        annotations.setdefault(DEFAULT_CONTAINER_ANNOTATION, app_containers[0].get("name"))
    return spec, meta


def _init_containers_first(spec: dict) -> dict:
    """The same spec with initContainers just before containers, as people write it."""
    keys = [k for k in spec if k != "initContainers"]
    at = keys.index("containers") if "containers" in keys else len(keys)
    keys.insert(at, "initContainers")
    return {k: spec[k] for k in keys}


def already_injected(spec: dict, meta: dict) -> bool:
    """True if the status annotation or one of our container names is there."""
    if STATUS_ANNOTATION in (meta.get("annotations") or {}):
        return True
    names = {c.get("name") for field in ("initContainers", "containers") for c in spec.get(field) or []
             if isinstance(c, dict)}
    return bool(names & {INIT_NAME, VALIDATION_NAME, PROXY_NAME})


def conflicts(spec: dict, options: Options) -> list[tuple[str, str]]:
    """(field path in the pod spec, problem) for a spec the sidecar cannot work in."""
    problems: list[tuple[str, str]] = []
    pod_uid = (spec.get("securityContext") or {}).get("runAsUser")
    pod_gid = (spec.get("securityContext") or {}).get("runAsGroup")
    for field in ("initContainers", "containers"):
        for i, container in enumerate(spec.get(field) or []):
            where = f"{field}[{i}]"
            for j, port in enumerate(container.get("ports") or []):
                number = port.get("containerPort") if isinstance(port, dict) else None
                if number in (DEFAULT_PORT, ADMIN_PORT):
                    what = "redirected port" if number == DEFAULT_PORT else "admin port"
                    problems.append((f"{where}.ports[{j}].containerPort",
                                     f"{number} is the proxy's {what}; the pod's containers share one network"))
            if options.method != "uid":
                continue
            # The uid method lets the proxy's UID through unredirected: an
            # app running as that UID would silently bypass the proxy.
            own_uid = (container.get("securityContext") or {}).get("runAsUser")
            if own_uid == options.proxy_uid:
                problems.append((f"{where}.securityContext.runAsUser",
                                 f"{own_uid} is the proxy's UID; this container's traffic would bypass the proxy "
                                 "(run it as another UID, or pick another with --proxy-uid)"))
            elif own_uid is None and pod_uid == options.proxy_uid:
                problems.append(("securityContext.runAsUser",
                                 f"{pod_uid} is the proxy's UID and {where} ({container.get('name')}) inherits it; "
                                 "its traffic would bypass the proxy"))
            if not options.tproxy:
                continue
            # with TPROXY the proxy runs in group proxy_uid, and the rules bypass that group too
            own_gid = (container.get("securityContext") or {}).get("runAsGroup")
            if own_gid == options.proxy_uid or (own_gid is None and pod_gid == options.proxy_uid):
                path = f"{where}.securityContext.runAsGroup" if own_gid is not None else "securityContext.runAsGroup"
                problems.append((path, f"{options.proxy_uid} is the proxy's group with TPROXY; {where}'s traffic "
                                       "would bypass the proxy"))
    return problems
