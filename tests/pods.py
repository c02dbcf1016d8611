"""Podman for the pod tests (tests/e2e/test_pods.py): the images built from the
Dockerfile on local Debian bases, pods played from manifests, and a small
network for them.

No registry is reachable from these machines, but Debian's packages are, and
`podman` (as root) both builds images and plays Kubernetes manifests. What
was found about it here, and what each part below does about it:

- Runtime. `crun` does not start on this cgroup v1/v2 hybrid; `runc` with the
  cgroupfs manager does. There is no CAP_SYS_RESOURCE, so podman's default
  ulimits (above the hard limit) fail every container with `setrlimit`; the
  containers.conf below sets limits within it, which also covers the pod's
  infra container (it takes no --ulimit flag).
- Everything of a run is private: its own image store (--root/--runroot),
  tmp dir, network config and events log, all in one work directory that is
  removed at the end. Only the Debian base tarballs are kept between runs
  (CACHE), keyed by what the Dockerfile asks of each base.
- Bases: `debootstrap --variant=minbase bookworm` from the Debian mirror apt
  uses, + the packages the Dockerfile's "local Debian base:" line names, then
  `podman import`. pip inside the build gets the host's CA bundle (mounted,
  and named by the builder stage's PIP_CERT build argument).
- Pods get `kube play --network none`: a network namespace with only `lo`.
  `Node` then wires them as a CNI plugin would: a veth into each pod's
  namespace (found from its infra container's PID), documentation addresses,
  routes through a "node" namespace the test makes. Nothing is wired to the
  host's network.
- `for_podman` turns what Kubernetes runs into what podman 4.3 runs; every
  change it makes is a gap of podman's, named there.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from proxy.demo.netns import NetNs, run, unique_suffix

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"
PODAPPS = Path(__file__).resolve().parent / "podapps"
CACHE = Path(os.environ.get("SIDECAR_PROXY_TEST_CACHE", "/var/cache/sidecar-proxy-tests"))
SUITE = "bookworm"
# Bump when the way a base is made below changes: the cached tarballs' key has it.
BASE_RECIPE = 1
UNUSED_BASE_DAYS = 14  # a cached base nobody used for this long is removed

PROXY_IMAGE = "localhost/sidecar-proxy:test"
INIT_IMAGE = "localhost/sidecar-proxy-init:test"
APP_IMAGE = "localhost/podapps:test"  # tests/podapps: the plain app, and agnhost's stand-in
AGNHOST = "registry.k8s.io/e2e-test-images/agnhost:2.53"
CA_BUNDLE_CANDIDATES = ("PIP_CERT", "REQUESTS_CA_BUNDLE", "SSL_CERT_FILE")
DEFAULT_CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"

# podman 4.3 rejects annotation values longer than a label's 63 characters
# (Kubernetes has no such limit for annotations).
ANNOTATION_LIMIT = 63
INIT_TYPE_ANNOTATION = "io.podman.annotations.init.container.type"


# --- the Dockerfile's needs of its bases ---------------------------------------------

def base_needs(dockerfile: Path = DOCKERFILE) -> dict[str, tuple[str, ...]]:
    """{ARG name: Debian packages on top of minbase} from the Dockerfile's
    `# local Debian base: minbase [+ PKG...]` lines, each just above its ARG."""
    needs: dict[str, tuple[str, ...]] = {}
    pending: tuple[str, ...] | None = None
    for line in dockerfile.read_text().splitlines():
        m = re.fullmatch(r"#\s*local Debian base:\s*minbase(?:\s*\+\s*(?P<pkgs>.*))?", line.strip())
        if m:
            pending = tuple((m["pkgs"] or "").split())
            continue
        m = re.match(r"ARG\s+(\w+)=", line)
        if m and pending is not None:
            needs[m[1]] = pending
        if line.strip() and not line.startswith("#"):
            pending = None
    return needs


def apt_mirror() -> str:
    """The Debian mirror apt is configured with (deb822 or one-line sources)."""
    sources = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for path in sources:
        if not path.is_file():
            continue
        text = path.read_text(errors="replace")
        if path.suffix == ".sources":
            for block in re.split(r"\n\s*\n", text):
                fields = dict(re.findall(r"^(\w[\w-]*):\s*(.*)$", block, re.MULTILINE))
                if ("deb" in fields.get("Types", "").split() and SUITE in fields.get("Suites", "").split()
                        and "main" in fields.get("Components", "").split()):
                    return fields["URIs"].split()[0]
        else:
            for line in text.splitlines():
                words = line.split("#", 1)[0].split()
                words = [w for w in words if not w.startswith("[")]
                if len(words) >= 4 and words[0] == "deb" and words[2] == SUITE and "main" in words[3:]:
                    return words[1]
    raise RuntimeError(f"no apt source for Debian {SUITE} main: cannot debootstrap a base")


def ca_bundle() -> str:
    for var in CA_BUNDLE_CANDIDATES:
        value = os.environ.get(var)
        if value and os.path.isfile(value):
            return value
    return DEFAULT_CA_BUNDLE


@dataclass
class Base:
    packages: tuple[str, ...]
    tarball: Path
    seconds: float  # 0.0 when it came from the cache


def debian_base(packages: tuple[str, ...]) -> Base:
    """A bookworm minbase (+ packages) root file system as a tarball, made once
    and cached under CACHE by what makes it: suite, mirror, packages, recipe."""
    mirror = apt_mirror()
    recipe = {"suite": SUITE, "variant": "minbase", "mirror": mirror, "packages": sorted(packages),
              "recipe": BASE_RECIPE}
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]
    CACHE.mkdir(parents=True, exist_ok=True)
    tarball = CACHE / f"debian-{SUITE}-{key}.tar"
    with open(CACHE / f"debian-{SUITE}-{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a parallel run waits for the one making it
        if tarball.exists():
            os.utime(tarball)
            return Base(packages, tarball, 0.0)
        started = time.monotonic()
        tmp = Path(tempfile.mkdtemp(prefix=f".make-{key}-", dir=CACHE))
        try:
            rootfs = tmp / "rootfs"
            argv = ["debootstrap", "--variant=minbase"]
            if packages:
                argv.append("--include=" + ",".join(packages))
            result = subprocess.run([*argv, SUITE, str(rootfs), mirror], capture_output=True, text=True,
                                    timeout=900)
            if result.returncode != 0:
                raise RuntimeError(f"debootstrap failed ({result.returncode}): {result.stderr.strip()[-2000:]}")
            # What debootstrap leaves that no image needs: the downloaded
            # packages and apt's lists and caches (a build runs apt-get update).
            for pattern in ("var/cache/apt/archives/*.deb", "var/cache/apt/*.bin", "var/lib/apt/lists/*"):
                for path in rootfs.glob(pattern):
                    if path.is_file():
                        path.unlink()
            part = tmp / "rootfs.tar"
            run(["tar", "--numeric-owner", "-C", str(rootfs), "-cf", str(part), "."])
            os.replace(part, tarball)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        _prune_cache(keep=tarball)
        return Base(packages, tarball, time.monotonic() - started)


def _prune_cache(keep: Path) -> None:
    cutoff = time.time() - UNUSED_BASE_DAYS * 86400
    for path in CACHE.glob(f"debian-{SUITE}-*.tar"):
        if path != keep and path.stat().st_mtime < cutoff:
            path.unlink(missing_ok=True)
            (path.with_suffix(".lock")).unlink(missing_ok=True)


# --- podman with a private store ------------------------------------------------------

class Podman:
    """`podman` with this run's own store, runtime settings and events log."""

    def __init__(self) -> None:
        self.work = Path(tempfile.mkdtemp(prefix="sidecar-proxy-pods-", dir="/var/tmp"))
        self.conf = self.work / "containers.conf"
        self.events = self.work / "events.log"
        self.hosts = self.work / "hosts"
        for sub in ("root", "runroot", "tmp", "networks"):
            (self.work / sub).mkdir()
        # The pods' /etc/hosts: the cluster DNS's part, for the Service names
        # the manifests use (Node.service).
        self.hosts.write_text("127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n")
        self.conf.write_text(f"""\
[containers]
# No CAP_SYS_RESOURCE here: podman's default limits are above the hard limit.
default_ulimits = ["nofile=4096:4096", "nproc=4096:4096"]
log_driver = "k8s-file"
base_hosts_file = "{self.hosts}"

[engine]
# crun refuses this cgroup v1/v2 hybrid; runc with cgroupfs works.
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = "{self.events}"
tmp_dir = "{self.work / 'tmp'}"

[network]
network_config_dir = "{self.work / 'networks'}"
""")
        self.env = {**os.environ, "CONTAINERS_CONF": str(self.conf)}

    def argv(self, *args: str) -> list[str]:
        return ["podman", "--root", str(self.work / "root"), "--runroot", str(self.work / "runroot"),
                "--storage-driver", "overlay", *args]

    def run(self, *args: str, check: bool = True, input: str | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(self.argv(*args), capture_output=True, text=True, input=input, env=self.env,
                              timeout=timeout)
        if check and proc.returncode != 0:
            raise RuntimeError(f"podman {' '.join(args)[:300]} exited {proc.returncode}: "
                               f"{proc.stderr.strip()[-3000:]}")
        return proc

    def out(self, *args: str, **kwargs) -> str:
        return self.run(*args, **kwargs).stdout.strip()

    def inspect(self, name: str, template: str) -> str:
        return self.out("inspect", name, "--format", template)

    def image_size(self, image: str) -> int:
        return int(self.out("image", "inspect", image, "--format", "{{.Size}}"))

    def events_of(self, name: str) -> list[dict]:
        """This run's events (JSON lines) for the container now named `name`
        (by its ID: an earlier container may have had the name)."""
        container_id = self.inspect(name, "{{.ID}}")
        found = []
        for line in self.events.read_text().splitlines() if self.events.exists() else []:
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if event.get("Type") == "container" and event.get("ID") == container_id:
                    found.append(event)
        return found

    def close(self) -> None:
        """Remove everything this run made (it is all in the private store),
        then the store; fail if anything is left mounted."""
        for args in (("pod", "rm", "--all", "--force"), ("rm", "--all", "--force"),
                     ("volume", "rm", "--all", "--force"), ("rmi", "--all", "--force")):
            self.run(*args, check=False, timeout=120)
        left = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()
                if line.split()[4].startswith(str(self.work))]
        for mountpoint in reversed(left):  # podman's own mount of its store, at most
            subprocess.run(["umount", mountpoint], capture_output=True)
        shutil.rmtree(self.work)


# --- the images ------------------------------------------------------------------------

@dataclass
class Built:
    """What the build took: seconds per step and image sizes (bytes)."""

    seconds: dict[str, float] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)
    bases: dict[str, str] = field(default_factory=dict)  # ARG -> local image

    def summary(self) -> str:
        times = ", ".join(f"{k} {v:.1f}s" for k, v in self.seconds.items())
        sizes = ", ".join(f"{k} {v / 1e6:.0f} MB" for k, v in self.sizes.items())
        return f"pod images: {times}; sizes: {sizes}"


def build_args(bases: dict[str, str], target: str, tag: str) -> list[str]:
    """The build command of the Dockerfile's comment, plus the CA bundle for pip
    and `--format docker` (an OCI image config has no HEALTHCHECK)."""
    bundle = ca_bundle()
    return ["build", "--network", "host",
            *(a for name, image in bases.items() for a in ("--build-arg", f"{name}={image}")),
            "--volume", f"{bundle}:{bundle}:ro", "--build-arg", f"PIP_CERT={bundle}",
            "--format", "docker", "--target", target, "-t", tag, str(REPO)]


def build_images(podman: Podman) -> Built:
    built = Built()
    for arg, packages in base_needs().items():
        started = time.monotonic()
        base = debian_base(packages)
        name = f"localhost/debian-{SUITE}-{arg.lower().replace('_', '-')}:test"
        with open(base.tarball, "rb") as tar:
            proc = subprocess.run(podman.argv("import", "-", name), stdin=tar, capture_output=True, text=True,
                                  env=podman.env, timeout=300)
        if proc.returncode != 0:
            raise RuntimeError(f"podman import {base.tarball}: {proc.stderr.strip()}")
        built.bases[arg] = name
        built.seconds[f"base {arg}" + ("" if base.seconds else " (cached)")] = time.monotonic() - started
    for target, tag in (("proxy", PROXY_IMAGE), ("init", INIT_IMAGE)):
        started = time.monotonic()
        podman.run(*build_args(built.bases, target, tag), timeout=900)
        built.seconds[target] = time.monotonic() - started
        built.sizes[target] = podman.image_size(tag)
    started = time.monotonic()
    podman.run("build", "--network", "none", "--build-arg", f"BASE={built.bases['PYTHON_BASE']}",
               "-f", str(PODAPPS / "Containerfile"), "-t", APP_IMAGE, str(PODAPPS))
    built.seconds["apps"] = time.monotonic() - started
    for arg, image in built.bases.items():
        built.sizes[f"base {arg}"] = podman.image_size(image)
    return built


# --- from Kubernetes to podman 4.3 -----------------------------------------------------

_VAR = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion in command and args ($$ escapes, unknown stays)."""
    out, i = [], 0
    while i < len(text):
        if text.startswith("$$", i):
            out.append("$")
            i += 2
            continue
        m = _VAR.match(text, i)
        if m and m[1] in env:
            out.append(env[m[1]])
            i = m.end()
            continue
        out.append(text[i])
        i += 1
    return "".join(out)


def pod_spec(doc: dict) -> dict:
    """The pod spec of a Pod or of a workload's template."""
    return doc["spec"] if doc["kind"] == "Pod" else doc["spec"]["template"]["spec"]


def for_podman(docs: list[dict], images: dict[str, str]) -> list[dict]:
    """The documents `podman kube play` (4.3) runs the way Kubernetes would run
    `docs`. The images are substituted (`images`: old -> new); every other
    change below is a podman gap, and only those are made:

    1. Only Pods and Deployments are played: a Job becomes the Pod of its
       template; Services and the rest are left out (podman ignores them; the
       test's Node stands in for kube-proxy and cluster DNS).
    2. Annotations longer than 63 characters are dropped: podman applies the
       label limit to annotation values (sidecar-proxy/status is longer).
    3. restartPolicy Always (said or implied) becomes OnFailure: podman 4.3
       applies the pod's restart policy to init containers too, so an init
       container that exits 0 is restarted and `kube play` fails ("failed to
       remove once init container"; podman#16343). In Kubernetes Always means
       a container that exits 0 is restarted, which none here does on its own.
    4. No native sidecars: podman waits for every init container to exit, and
       a native sidecar (restartPolicy Always) never does. It becomes a
       classic one: first of `containers`, without its startupProbe.
    5. containerPorts without a hostPort are dropped: podman 4.3 publishes
       them on the host, which needs a bridge network (Kubernetes publishes
       none; they are informational).
    6. $(VAR) in command and args is expanded from the container's env, as
       the kubelet does; podman passes it on literally. The downward API's
       metadata.uid (podman has none) gets a fresh UUID per pod.

    And one change for the test's eyes: init containers are of podman's
    "always" type (run at every start of the pod, as Kubernetes does when it
    recreates a pod's sandbox), not "once", which removes the container, and
    its log and exit code with it, as soon as it has run.
    """
    out = []
    for doc in copy.deepcopy(docs):
        kind = doc.get("kind")
        if kind == "Job":
            template = doc["spec"]["template"]
            doc = {"apiVersion": "v1", "kind": "Pod",
                   "metadata": {**template.get("metadata", {}), "name": doc["metadata"]["name"]},
                   "spec": template["spec"]}
        elif kind not in ("Pod", "Deployment"):
            continue
        meta, spec = ((doc["metadata"], doc["spec"]) if doc["kind"] == "Pod"
                      else (doc["spec"]["template"].setdefault("metadata", {}), doc["spec"]["template"]["spec"]))
        # (podman reads a Deployment's annotations from its own metadata, not
        # from its pod template's, so both get the same treatment)
        for where in {id(m): m for m in (meta, doc["metadata"])}.values():
            annotations = where.get("annotations") or {}
            for key in [k for k, v in annotations.items() if len(str(v)) > ANNOTATION_LIMIT]:
                del annotations[key]
            annotations[INIT_TYPE_ANNOTATION] = "always"
            where["annotations"] = annotations
        if spec.get("restartPolicy", "Always") == "Always":
            spec["restartPolicy"] = "OnFailure"
        natives = [c for c in spec.get("initContainers") or [] if c.get("restartPolicy") == "Always"]
        for container in natives:
            spec["initContainers"].remove(container)
            container.pop("restartPolicy")
            container.pop("startupProbe", None)
        spec["containers"] = natives + spec["containers"]
        pod_uid = str(uuid.uuid4())
        for container in (spec.get("initContainers") or []) + spec["containers"]:
            container["image"] = images.get(container["image"], container["image"])
            ports = [p for p in container.pop("ports", []) if p.get("hostPort")]
            if ports:
                container["ports"] = ports
            env = {}
            for var in container.get("env") or []:
                if var.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "metadata.uid":
                    var.pop("valueFrom")
                    var["value"] = pod_uid
                if "value" in var:
                    env[var["name"]] = expand(str(var["value"]), env)
            for key in ("command", "args"):
                if key in container:
                    container[key] = [expand(str(word), env) for word in container[key]]
        out.append(doc)
    return out


# --- pods and their network ------------------------------------------------------------

class AttachedNetNs(NetNs):
    """A name (`ip netns attach`) for a network namespace some process holds:
    the pod's, held by its infra container. Deleting the name leaves the
    namespace to its holder."""

    def __init__(self, name: str, pid: int) -> None:  # no super().__init__(): it would make a new namespace
        self.name = name
        self.path = f"/run/netns/{name}"
        run(["ip", "netns", "attach", name, str(pid)])


@dataclass
class Pod:
    podman: Podman
    name: str
    pod_id: str
    infra_pid: int
    netns_inode: int
    ns: AttachedNetNs | None = None
    ids: list[str] = field(default_factory=list)  # its containers' IDs, infra's too, once stopped

    def container(self, short: str) -> str:
        return f"{self.name}-{short}"

    def exec(self, short: str, *argv: str, check: bool = True, timeout: float = 60) -> str:
        return self.podman.run("exec", self.container(short), *argv, check=check, timeout=timeout).stdout

    def python(self, short: str, code: str) -> str:
        return self.exec(short, "python", "-c", code)

    def admin(self, path: str) -> str:
        """GET the proxy's admin API from inside its container (loopback of the pod)."""
        return self.python("sidecar-proxy", "import sys, urllib.request; sys.stdout.write(urllib.request.urlopen("
                                            f"'http://127.0.0.1:15000{path}', timeout=5).read().decode())")

    def stats(self) -> dict[str, int]:
        lines = self.admin("/stats").splitlines()
        return {k: int(v) for k, _, v in (line.partition(": ") for line in lines) if v.lstrip("-").isdigit()}

    def proc_status(self, short: str) -> dict[str, str]:
        """/proc/1/status of a container, read inside it."""
        text = self.exec(short, "cat", "/proc/1/status")
        return {k: v.strip() for k, _, v in (line.partition(":") for line in text.splitlines())}

    def logs(self, short: str) -> str:
        proc = self.podman.run("logs", self.container(short))
        return proc.stdout + proc.stderr

    def state(self, short: str) -> dict:
        return json.loads(self.podman.inspect(self.container(short), "{{json .State}}"))

    def detach(self) -> None:
        if self.ns is not None:
            self.ns.close()
            self.ns = None


def create_pods(podman: Podman, docs: list[dict]) -> list[str]:
    """`kube play --start=false --network none` the documents; the pods' names."""
    text = "---\n".join(json.dumps(doc) for doc in docs)  # JSON is YAML
    podman.run("kube", "play", "--start=false", "--network", "none", "-", input=text)
    names = []
    for doc in docs:
        if doc["kind"] == "Pod":
            names.append(doc["metadata"]["name"])
        else:  # podman names a Deployment's pods NAME-pod-0, NAME-pod-1, ...
            names += [f"{doc['metadata']['name']}-pod-{i}" for i in range(doc["spec"].get("replicas", 1))]
    return names


def start_pod(podman: Podman, name: str, node: Node, v4: str, v6: str,
              kubelet_order: list[tuple[str, str]] | None = None, ready=None) -> Pod:
    """Start the pod's infra container (its network namespace), wire it into
    the node, then start the pod: podman runs the init containers, then
    starts the rest at once.

    With `kubelet_order` (see `kubelet_order`) the test does instead the part
    of the kubelet that podman lacks for native sidecars: init containers one
    by one, each to exit 0, then each sidecar until `ready(pod)` returns (its
    startupProbe's job), then the app containers."""
    pod_id = podman.out("pod", "inspect", name, "--format", "{{.ID}}")
    infra = podman.out("pod", "inspect", name, "--format", "{{.InfraContainerID}}")
    podman.run("start", infra)
    pid = int(podman.inspect(infra, "{{.State.Pid}}"))
    pod = Pod(podman, name, pod_id, pid, os.stat(f"/proc/{pid}/ns/net").st_ino)
    pod.ns = AttachedNetNs(f"scp-pod-{unique_suffix()}", pid)
    try:
        node.attach(pod.ns, v4, v6)
        if kubelet_order is None:
            podman.run("pod", "start", name)
        for short, role in kubelet_order or []:
            podman.run("start", pod.container(short))
            if role == "init":
                code = podman.out("wait", pod.container(short), timeout=120)
                if code != "0":
                    raise RuntimeError(f"init container {short} exited {code}")
            elif role == "sidecar":
                ready(pod)
    except BaseException as exc:
        pod.detach()  # the name would keep the namespace alive after the pod
        if not isinstance(exc, RuntimeError):
            raise
        init = podman.run("logs", f"{name}-sidecar-proxy-init", check=False)
        raise RuntimeError(f"{exc}\ninit container's log:\n{init.stdout}{init.stderr}") from None
    return pod


def kubelet_order(original: dict) -> list[tuple[str, str]] | None:
    """(container, role) in the order the kubelet starts a pod with native
    sidecars (roles: init, sidecar, app), from the manifest before for_podman;
    None for a pod without them (podman's own start does then)."""
    spec = pod_spec(original)
    inits = spec.get("initContainers") or []
    if not any(c.get("restartPolicy") == "Always" for c in inits):
        return None
    order = [(c["name"], "sidecar" if c.get("restartPolicy") == "Always" else "init") for c in inits]
    return order + [(c["name"], "app") for c in spec["containers"]]


class Node:
    """The namespace the pods are wired to, as a node's CNI would: a veth per
    pod, the pod's address a /32 (/128) routed to it, and the node's address
    as every pod's gateway. Nothing here reaches the host's network.

    node  192.0.2.1, 2001:db8:1::1       (on every veth: the pods' gateway)
    pods  192.0.2.10 ..., 2001:db8:1::10 ...
    "remote services": all of 198.51.100.0/24 and 2001:db8:2::/64 are local
    to the node (servers the test runs there); Service IPs are 203.0.113.0/24.
    """

    GATEWAY4, GATEWAY6 = "192.0.2.1", "2001:db8:1::1"

    def __init__(self) -> None:
        self.suffix = unique_suffix()
        self.ns = NetNs(f"scp-node-{self.suffix}")
        self.links = 0
        try:
            for sysctl in ("net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"):
                self.ns.exec("sysctl", "-qw", sysctl)
            self.ns.ip("route", "add", "local", "198.51.100.0/24", "dev", "lo")
            self.ns.ip("-6", "route", "add", "local", "2001:db8:2::/64", "dev", "lo")
            # Service IPs: a route for the node's own connections to find
            # before the DNAT in OUTPUT sends them on to an endpoint
            self.ns.ip("route", "add", "local", "203.0.113.0/24", "dev", "lo")
        except BaseException:
            self.ns.close()
            raise

    def attach(self, pod: NetNs, v4: str, v6: str) -> None:
        self.links += 1
        veth = f"nv{self.links}{self.suffix}"[:15]
        run(["ip", "link", "add", veth, "netns", self.ns.name, "type", "veth", "peer", "name", "eth0",
             "netns", pod.name])
        self.ns.ip("addr", "add", f"{self.GATEWAY4}/32", "dev", veth)
        self.ns.ip("-6", "addr", "add", f"{self.GATEWAY6}/128", "dev", veth, "nodad")
        self.ns.ip("link", "set", veth, "up")
        self.ns.ip("route", "add", f"{v4}/32", "dev", veth)
        self.ns.ip("-6", "route", "add", f"{v6}/128", "dev", veth)
        pod.ip("addr", "add", f"{v4}/32", "dev", "eth0")
        pod.ip("-6", "addr", "add", f"{v6}/128", "dev", "eth0", "nodad")
        pod.ip("link", "set", "eth0", "up")
        pod.ip("route", "add", self.GATEWAY4, "dev", "eth0", "scope", "link")
        pod.ip("route", "add", "default", "via", self.GATEWAY4, "dev", "eth0")
        pod.ip("-6", "route", "add", self.GATEWAY6, "dev", "eth0")
        pod.ip("-6", "route", "add", "default", "via", self.GATEWAY6, "dev", "eth0")

    def service(self, podman: Podman, name: str, vip: str, port: int, endpoints: list[tuple[str, int]]) -> None:
        """What kube-proxy and cluster DNS do for a Service: `name` resolves to
        `vip` in the pods, and vip:port is DNATed to the endpoints in turn."""
        with open(podman.hosts, "a") as f:
            f.write(f"{vip} {name} {name}.default.svc.cluster.local\n")
        for chain in ("PREROUTING", "OUTPUT"):  # from the pods, and from the node itself
            for i, (address, target_port) in enumerate(endpoints):
                left = len(endpoints) - i
                pick = ["-m", "statistic", "--mode", "nth", "--every", str(left), "--packet", "0"] if left > 1 else []
                self.ns.exec("iptables", "-t", "nat", "-A", chain, "-d", f"{vip}/32", "-p", "tcp",
                             "--dport", str(port), *pick, "-j", "DNAT", "--to-destination",
                             f"{address}:{target_port}")

    def close(self) -> None:
        self.ns.close()


# --- what a pod leaves behind -----------------------------------------------------------

def holders_of_netns(inode: int) -> list[str]:
    """Processes, and nsfs mounts, that still hold the network namespace `inode`."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            if os.stat(f"/proc/{pid}/ns/net").st_ino == inode:
                found.append(f"process {pid} ({Path(f'/proc/{pid}/comm').read_text().strip()})")
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        if f"net:[{inode}]" in line:
            found.append(f"mount {line.split()[4]}")
    return found


def processes_naming(words: list[str]) -> list[str]:
    """Processes whose command line names any of `words` (conmon names its container's ID)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if any(w in cmdline for w in words):
                found.append(f"{pid}: {cmdline[:120]}")
    return found


@contextlib.contextmanager
def net_cls_root() -> Iterator[Path]:
    """A net_cls hierarchy mounted on a fresh directory, for the cgroup
    method's hostPath (this host mounts none at /sys/fs/cgroup/net_cls)."""
    top = Path(tempfile.mkdtemp(prefix="scp-pods-cg-"))
    top.chmod(0o755)
    root = top / "net_cls"
    root.mkdir()
    run(["mount", "-t", "cgroup", "-o", "net_cls", "net_cls", str(root)])
    try:
        yield root
    finally:
        for child in root.glob("sidecar-proxy-*"):
            for _ in range(50):
                try:
                    child.rmdir()
                    break
                except OSError:
                    time.sleep(0.05)
        run(["umount", str(root)])
        shutil.rmtree(top)
