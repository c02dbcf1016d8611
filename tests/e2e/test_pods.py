"""The images and the manifests for real: `podman build` and `podman kube play`.

Both images are built from the Dockerfile on local Debian bases (no registry
is reachable here; see tests/pods.py for how, and for what podman needed).
Then real pods run from them, in network namespaces the test makes:

- a plain app Pod, injected by `sidecar-proxy inject` for each bypass method
  a pod runtime can do here: uid, mark and cgroup (on a net_cls hierarchy
  the test mounts, given to inject as --cgroup-root). Not explicit yet: it
  needs a ConfigMap with the proxy's config and its services file, which
  the pod set-up here does not make yet (the netns tests cover the method;
  deploy/README.md says what a pod needs);
- the examples users copy, deploy/sidecar-uid.yaml, sidecar-mark.yaml and
  sidecar-tproxy.yaml, with only their images substituted.

What each pod must show, read from inside it (`podman exec`, or the pod's
network namespace): the app's outbound and inbound connections went through
the proxy with their bytes intact (the proxy's access log and /stats say so);
the proxy's own upstream connections were not captured (the redirect
counters count only the app's, and the loop guard refused nothing); the
proxy runs as the manifest says (UID, CapEff from /proc/1/status); the init
container ran once and exited 0; `podman pod stop` drains the proxy (exit 0);
`podman kube down` leaves no pod, container, process or namespace.

The pods' traffic stays in namespaces the test made: the pod's own (podman's,
with --network none) and the "node" one (tests/pods.py: Node).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pods
import pytest
import yaml
from pods import APP_IMAGE, INIT_IMAGE, PROXY_IMAGE, Node, Podman
from support import Server, digest_sink, echo, recv_line

pytestmark = [pytest.mark.netns, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts"
POD_V4, POD_V6 = "192.0.2.10", "2001:db8:1::10"
SERVICE_V4, SERVICE_V6 = "198.51.100.10", "2001:db8:2::10"  # servers in the node namespace
HELD = ("198.51.100.11", 80)  # a server that never closes: a live connection for the drain
APP_PORT = 8080
PAYLOAD = 300_000
READY_SECONDS = 60


# --- fixtures -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def podman(netns_prerequisites):
    missing = [tool for tool in ("podman", "runc", "debootstrap", "conmon") if shutil.which(tool) is None]
    if missing:
        pytest.fail(f"missing for the pod tests: {', '.join(missing)} (run.sh installs them)")
    p = Podman()
    try:
        yield p
    finally:
        p.close()


@pytest.fixture(scope="module")
def images(podman, request):
    built = pods.build_images(podman)
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "pod-images.json").write_text(json.dumps(
        {"seconds": built.seconds, "sizes": built.sizes}, indent=2) + "\n")
    # on the terminal whatever the outcome (CI's log keeps the build's cost)
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():
            reporter.write_line("")
            reporter.write_line(built.summary())
    return built


@pytest.fixture
def node(netns_prerequisites):
    n = Node()
    try:
        yield n
    finally:
        n.close()


# --- helpers --------------------------------------------------------------------------------

def inject(documents: list[dict], *flags: str) -> list[dict]:
    """`sidecar-proxy inject` of this checkout, with the images just built."""
    proc = subprocess.run([sys.executable, "-m", "proxy", "inject", "-f", "-", "--image", PROXY_IMAGE,
                           "--init-image", INIT_IMAGE, *flags],
                          input=yaml.safe_dump_all(documents), capture_output=True, text=True, cwd=REPO,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    return list(yaml.safe_load_all(proc.stdout))


def app_pod(name: str) -> dict:
    """A plain app Pod, as a user writes it: one container, an ordinary UID."""
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": name}},
        "spec": {
            # Never: a test wants to see a failure, not a restart.
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 30,
            "containers": [{
                "name": "app", "image": APP_IMAGE,
                "command": ["python", "/opt/podapps/app.py", "serve", str(APP_PORT)],
                "securityContext": {"runAsUser": 1000, "runAsGroup": 1000, "runAsNonRoot": True,
                                    "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                    "capabilities": {"drop": ["ALL"]}},
            }],
        },
    }


def wait_ready(pod: pods.Pod) -> None:
    deadline = time.monotonic() + READY_SECONDS
    while True:
        proxy = pod.state("sidecar-proxy")
        if proxy["Status"] != "running":
            pytest.fail(f"{pod.name}: the proxy is {proxy['Status']} (exit {proxy['ExitCode']}):\n"
                        f"{pod.logs('sidecar-proxy')[-2000:]}")
        probe = pod.podman.run("exec", pod.container("sidecar-proxy"), "python", "-c",
                               "import urllib.request; urllib.request.urlopen("
                               "'http://127.0.0.1:15000/ready', timeout=2)", check=False)
        if probe.returncode == 0:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"{pod.name}: the proxy was not ready in {READY_SECONDS}s:\n{pod.logs('sidecar-proxy')}")
        time.sleep(0.2)


def assert_identity(pod: pods.Pod, uid: int, cap_eff: int) -> None:
    status = pod.proc_status("sidecar-proxy")
    assert status["Uid"].split() == [str(uid)] * 4, status["Uid"]
    assert int(status["CapEff"], 16) == cap_eff, f"CapEff {status['CapEff']}, want {cap_eff:#x}"
    assert int(status["CapPrm"], 16) == cap_eff and int(status["CapAmb"], 16) == 0
    assert status["NoNewPrivs"] == "1"
    cmdline = pod.exec("sidecar-proxy", "cat", "/proc/1/cmdline").split("\0")
    assert cmdline[1:3] == ["/usr/local/sidecar-proxy/bin/sidecar-proxy", "run"], \
        f"PID 1 of the proxy container is {cmdline}: the image's entrypoint, exec form"


def assert_init_ran_once(podman: Podman, pod: pods.Pod) -> None:
    """The init step, and the validation container after it, ran once and
    exited 0; the validation found the redirect working."""
    for name, said in (("sidecar-proxy-init", "installed: method"),
                       ("sidecar-proxy-validation", "passed: the redirect works")):
        container = pod.container(name)
        starts = [e for e in podman.events_of(container) if e["Status"] == "start"]
        assert len(starts) == 1, f"{name} started {len(starts)} times"
        state = pod.state(name)
        assert (state["Status"], state["ExitCode"]) == ("exited", 0), (name, state, pod.logs(name)[-2000:])
        assert said in pod.logs(name), pod.logs(name)[-2000:]


def redirect_counts(pod: pods.Pod) -> dict[str, int]:
    """Packets (one per connection, in the nat table) that the redirect rules
    sent to the proxy, per chain and family: `iptables-save -c` in the pod."""
    counts = {}
    for family, tool in (("4", "iptables-save"), ("6", "ip6tables-save")):
        text = pod.ns.exec(tool, "-c", "-t", "nat").stdout
        for chain in ("SIDECAR_REDIRECT", "SIDECAR_IN_REDIRECT"):
            counts[f"{chain}/{family}"] = sum(
                int(m[1]) for m in re.finditer(rf"^\[(\d+):\d+\] -A {chain} .*-j REDIRECT", text, re.MULTILINE))
    return counts


def send_from_app(pod: pods.Pod, host: str, port: int) -> dict:
    return json.loads(pod.exec("app", "python", "/opt/podapps/app.py", "send", host, str(port), str(PAYLOAD)))


def send_to_app(ns, host: str, port: int) -> tuple[str, str, str]:
    """From the node: PAYLOAD bytes to the app, half-close, its answer (bytes, sha256, peer)."""
    payload = random.Random(7).randbytes(PAYLOAD)
    with ns.connect((host, port), timeout=20) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        count, digest, peer = recv_line(sock).split()
    assert (int(count), digest) == (PAYLOAD, hashlib.sha256(payload).hexdigest()), "inbound bytes changed"
    return count, digest, peer


def stop_pod(podman: Podman, pod: pods.Pod) -> str:
    """`podman pod stop`: the proxy must drain and exit 0 within the grace
    period. Returns the proxy's log as it stopped."""
    pod.ids = podman.out("ps", "--all", "--no-trunc", "--filter", f"pod={pod.pod_id}", "--format", "{{.ID}}").split()
    started = time.monotonic()
    podman.run("pod", "stop", pod.name, timeout=120)
    took = time.monotonic() - started
    proxy = pod.state("sidecar-proxy")
    assert proxy["ExitCode"] == 0, f"the proxy exited {proxy['ExitCode']} on SIGTERM:\n{pod.logs('sidecar-proxy')}"
    assert took < 30, f"pod stop took {took:.1f}s: beyond the manifests' terminationGracePeriodSeconds"
    log = pod.logs("sidecar-proxy")
    pod.detach()
    return log


def kube_down(podman: Podman, manifest: list[dict], stopped: list[pods.Pod]) -> None:
    """`podman kube down` of what was played: nothing of the pods may be left."""
    podman.run("kube", "down", "-", input="---\n".join(json.dumps(d) for d in manifest))
    for pod in stopped:
        assert podman.run("pod", "exists", pod.name, check=False).returncode == 1, f"kube down left {pod.name}"
        left = podman.out("ps", "--all", "--no-trunc", "--format", "{{.ID}} {{.Names}}").splitlines()
        assert not [line for line in left if line.split()[0] in pod.ids], f"kube down left containers: {left}"
        assert pods.holders_of_netns(pod.netns_inode) == [], f"{pod.name}'s network namespace is still held"
        assert pods.processes_naming(pod.ids + [pod.pod_id]) == [], f"processes of {pod.name} still run"
    # podman 4.3 makes each emptyDir an anonymous volume named after it
    # (shared by the pods that name it alike), and kube down keeps it where
    # Kubernetes deletes an emptyDir with its pod: those, and nothing else,
    # may be left; the test removes the ones no container uses any more.
    empty_dirs = {v["name"] for d in manifest for v in pods.pod_spec(d).get("volumes", []) if "emptyDir" in v}
    volumes = set(podman.out("volume", "ls", "--format", "{{.Name}}").split())
    assert volumes <= empty_dirs, f"kube down left volumes: {sorted(volumes - empty_dirs)}"
    podman.run("volume", "prune", "--force")


# --- the images -------------------------------------------------------------------------------

def test_images_are_what_the_dockerfile_says(podman, images):
    [image] = json.loads(podman.out("image", "inspect", PROXY_IMAGE))
    config = image["Config"]
    assert config.get("User") == "1337:1337", "the image must run as the proxy's UID"
    assert config["Entrypoint"] == ["sidecar-proxy"] and config["Cmd"] == ["run"]
    assert config["StopSignal"] == "SIGTERM"
    assert set(config["ExposedPorts"]) == {"5001/tcp", "15000/tcp"}
    assert "127.0.0.1:15000/ready" in " ".join(image["Healthcheck"]["Test"])
    assert not [e for e in config["Env"] if e.startswith("PIP_CERT=")], \
        "the build's CA bundle argument must not stay in the image"

    def in_proxy(*argv: str) -> subprocess.CompletedProcess[str]:
        # (no health check: podman would want systemd to schedule it)
        return podman.run("run", "--rm", "--network", "none", "--no-healthcheck", "--entrypoint", argv[0],
                          PROXY_IMAGE, *argv[1:], check=False)

    files = in_proxy("sh", "-c", "id -u; id -g; test -e /usr/local/sidecar-proxy/bin/pip && echo pip; "
                                 "test -e /usr/local/sidecar-proxy/share/sidecar-proxy && echo scripts; "
                                 "command -v gcc cc || true")
    assert files.stdout.split() == ["1337", "1337"], f"no pip, no rule scripts, no compiler: {files.stdout}"
    # the runtime image carries the proxy alone: the tools exit 2 with one line
    tool = in_proxy("sidecar-proxy", "inject", "-f", "-")
    assert tool.returncode == 2 and len(tool.stderr.strip().splitlines()) == 1, tool.stderr
    # the health check the image declares answers for a running proxy
    name = f"scp-health-{os.getpid()}"
    podman.run("run", "-d", "--name", name, "--network", "none", PROXY_IMAGE)
    try:
        deadline = time.monotonic() + READY_SECONDS
        while podman.run("healthcheck", "run", name, check=False).returncode != 0:
            assert time.monotonic() < deadline, podman.out("logs", name)
            time.sleep(0.2)
        podman.run("stop", "--time", "30", name)
        assert podman.inspect(name, "{{.State.ExitCode}}") == "0", "PID 1 did not drain and exit 0 on SIGTERM"
    finally:
        podman.run("rm", "--force", name, check=False)

    init = json.loads(podman.out("image", "inspect", INIT_IMAGE, "--format", "{{json .Config}}"))
    assert init["Entrypoint"] == ["/bin/sh", "/usr/local/lib/sidecar-proxy/iptables/redirect.sh"]
    assert not init.get("Cmd")
    dry = podman.run("run", "--rm", "--network", "none", INIT_IMAGE, "--method", "uid", "--dry-run")
    assert "-j REDIRECT --to-ports 5001" in dry.stdout


# --- a plain Pod, injected ------------------------------------------------------------------

METHODS = {
    # method: (proxy UID, proxy CapEff)
    "uid": (1337, 0),
    "mark": (0, 1 << 12),  # CAP_NET_ADMIN only: SO_MARK
    "cgroup": (1337, 0),
}


# The uid method once more with inbound by TPROXY: the proxy runs as UID 0 with NET_ADMIN
# alone (IP_TRANSPARENT) in group 1337, which the rules then bypass; the app sees the client.
VARIANTS = [(method, "REDIRECT") for method in METHODS] + [("uid", "TPROXY")]


@pytest.mark.parametrize("method, interception", VARIANTS, ids=lambda v: v)
def test_injected_pod(podman, images, node, method, interception):
    tproxy = interception == "TPROXY"
    name = f"app-{method}{'-tproxy' if tproxy else ''}"
    with pods.net_cls_root() if method == "cgroup" else contextlib.nullcontext() as cgroup_root:
        flags = ["--method", method, "--interception-mode", interception]
        flags += ["--cgroup-root", str(cgroup_root)] if cgroup_root else []
        injected = inject([app_pod(name)], *flags)
        manifest = pods.for_podman(injected, {})
        pods.create_pods(podman, manifest)
        servers = [Server(node.ns, (SERVICE_V4, 80), digest_sink), Server(node.ns, (SERVICE_V6, 80), digest_sink),
                   Server(node.ns, HELD, echo)]
        pod = None
        try:
            pod = pods.start_pod(podman, name, node, POD_V4, POD_V6)
            wait_ready(pod)
            assert_identity(pod, *((0, 1 << 12) if tproxy else METHODS[method]))
            if tproxy:
                assert pod.proc_status("sidecar-proxy")["Gid"].split() == ["1337"] * 4
            assert_init_ran_once(podman, pod)
            if method == "cgroup":
                [leaf] = cgroup_root.glob("sidecar-proxy-*")
                assert (leaf / "cgroup.procs").stat().st_uid == 1337
                assert int((leaf / "net_cls.classid").read_text()) == 0x100001
                pid = int(podman.inspect(pod.container("sidecar-proxy"), "{{.State.Pid}}"))
                assert str(pid) in (leaf / "cgroup.procs").read_text().split(), "the proxy did not join its cgroup"
            # the validation container's probes were captured already: count from here
            validated = redirect_counts(pod)

            # outbound, both families: through the proxy, bytes intact, from the pod's address
            for host, server, source in ((SERVICE_V4, servers[0], POD_V4), (SERVICE_V6, servers[1], POD_V6)):
                sent = send_from_app(pod, host, 80)
                count, digest = sent["reply"].split()
                assert (int(count), digest) == (PAYLOAD, sent["sha256"]), f"outbound to {host}: bytes changed"
                assert [peer[0] for peer in server.accepted] == [source]
            # inbound: with REDIRECT the app sees the proxy's connection, not the node's; with
            # TPROXY the node's (the client's) address, through the proxy (its access log, below)
            _, _, peer = send_to_app(node.ns, POD_V4, APP_PORT)
            if tproxy:
                assert peer == Node.GATEWAY4, f"the app saw {peer}, not the client {Node.GATEWAY4}"
            else:
                assert peer in (POD_V4, "127.0.0.1"), f"the app saw {peer}: not through the proxy"

            stats = pod.stats()
            assert stats["direction.outbound.cx_total"] == 2 and stats["direction.inbound.cx_total"] == 1, stats
            assert stats["listener.[__]_5001.loop_guard_refused"] == 0
            log = pod.logs("sidecar-proxy")
            for where in (f"outbound {POD_V4}", f"-> {SERVICE_V4}:80", f"-> [{SERVICE_V6}]:80",
                          f"inbound {Node.GATEWAY4}", f"-> {POD_V4}:{APP_PORT}"):
                assert where in log, f"no access-log entry with {where!r}:\n{log}"
            # the proxy's own upstream connections (3) were not captured: the
            # rules sent the proxy exactly the app's connections
            counts = redirect_counts(pod)
            assert {k: counts[k] - validated[k] for k in counts} == {  # TPROXY'd inbound is not in nat
                "SIDECAR_REDIRECT/4": 1, "SIDECAR_IN_REDIRECT/4": 0 if tproxy else 1, "SIDECAR_REDIRECT/6": 1,
                "SIDECAR_IN_REDIRECT/6": 0}

            # a live connection when the pod stops: the proxy drains it, then exits 0
            podman.run("exec", "-d", pod.container("app"), "python", "/opt/podapps/app.py", "hold", *map(str, HELD))
            deadline = time.monotonic() + 10
            while pod.stats()["listener.[__]_5001.downstream_cx_active"] != 1:
                assert time.monotonic() < deadline, "the held connection never reached the proxy"
                time.sleep(0.1)
            log = stop_pod(podman, pod)
            kube_down(podman, manifest, [pod])
            assert f"-> {HELD[0]}:{HELD[1]}" in log, f"the proxy did not end the held connection:\n{log}"
        finally:
            for server in servers:
                server.close()
            if pod is not None:
                pod.detach()
            podman.run("pod", "rm", "--force", name, check=False)



# --- the examples in deploy/, as users copy them ---------------------------------------------

SERVICE_VIP = "203.0.113.80"
ECHO_PODS = ["192.0.2.20", "192.0.2.21"]  # the Deployment's two replicas
CLIENT_POD = "192.0.2.30"
DEPLOY_IMAGES = {"sidecar-proxy:0.1.0": PROXY_IMAGE, "sidecar-proxy-init:0.1.0": INIT_IMAGE,
                 pods.AGNHOST: APP_IMAGE}


def http_get(ns, url: str) -> str:
    # the socket is made in the node's namespace
    with ns.entered(), urllib.request.urlopen(url, timeout=10) as reply:
        return reply.read().decode()


@pytest.mark.parametrize("example, method", [("sidecar-uid.yaml", "uid"), ("sidecar-mark.yaml", "mark"),
                                             ("sidecar-tproxy.yaml", "uid")])
def test_deploy_example(podman, images, node, example, method):
    tproxy = example == "sidecar-tproxy.yaml"  # the uid method, inbound by TPROXY
    docs = list(yaml.safe_load_all((REPO / "deploy" / example).read_text()))
    manifest = pods.for_podman(docs, DEPLOY_IMAGES)
    deployment = [d for d in manifest if d["kind"] == "Deployment"]
    client = [d for d in manifest if d["kind"] == "Pod"]
    assert [d["metadata"]["name"] for d in deployment + client] == ["echo", "echo-client"]
    # the Service, as kube-proxy and cluster DNS would make it: echo:80 -> the
    # replicas' port named in targetPort
    [service] = [d for d in docs if d["kind"] == "Service"]
    [port] = service["spec"]["ports"]
    [echo_container] = [c for c in pods.pod_spec(docs[0])["containers"] if c["name"] == "echo"]
    [target] = [p["containerPort"] for p in echo_container["ports"] if p["name"] == port["targetPort"]]
    node.service(podman, service["metadata"]["name"], SERVICE_VIP, port["port"],
                 [(address, target) for address in ECHO_PODS])
    uid, cap_eff = (0, 1 << 12) if tproxy else METHODS[method]
    started: list[pods.Pod] = []
    try:
        names = pods.create_pods(podman, deployment)
        assert len(names) == len(ECHO_PODS) == docs[0]["spec"]["replicas"]
        for name, address in zip(names, ECHO_PODS, strict=True):
            started.append(pods.start_pod(podman, name, node, address, address.replace("192.0.2.", "2001:db8:1::")))
        for pod in started:
            wait_ready(pod)
            assert_identity(pod, uid, cap_eff)
            assert_init_ran_once(podman, pod)
        # through the Service from the node: kube-proxy's DNAT, then each
        # replica's inbound capture; agnhost sees its proxy, not the node (with
        # TPROXY: the node, through its proxy, whose access log says so)
        for pod, address in zip(started, ECHO_PODS, strict=True):
            assert http_get(node.ns, f"http://{SERVICE_VIP}/echo?msg=through-{pod.name}") == f"through-{pod.name}"
            seen = http_get(node.ns, f"http://{address}:{target}/clientip").rpartition(":")[0]
            if tproxy:
                assert seen == Node.GATEWAY4, f"{pod.name}'s app saw {seen}, not the client {Node.GATEWAY4}"
                assert f"inbound {Node.GATEWAY4}" in pod.logs("sidecar-proxy"), "not through its proxy"
            else:
                assert seen in (address, "127.0.0.1"), f"{pod.name}'s app saw {seen}: not through its proxy"

        # the Job's pod: its connect to echo:80 goes out through its own proxy
        [client_name] = pods.create_pods(podman, client)
        [job] = [d for d in docs if d["kind"] == "Job"]
        client_pod = pods.start_pod(podman, client_name, node, CLIENT_POD, "2001:db8:1::30",
                                    kubelet_order=pods.kubelet_order(job), ready=wait_ready)
        started.append(client_pod)
        exit_code = podman.out("wait", client_pod.container("client"), timeout=60)
        assert exit_code == "0", f"agnhost connect exited {exit_code}: {client_pod.logs('client')}"
        log = client_pod.logs("sidecar-proxy")
        assert f"outbound {CLIENT_POD}" in log and f"-> {SERVICE_VIP}:{port['port']}" in log, log
        inbound = [pod for pod in started[:-1] if f"inbound {CLIENT_POD}" in pod.logs("sidecar-proxy")]
        assert len(inbound) == 1, "the client's connection did not come in through one replica's proxy"
        assert_identity(client_pod, uid, cap_eff)

        for pod in reversed(started):
            stop_pod(podman, pod)
        kube_down(podman, client, [client_pod])
        kube_down(podman, deployment, started[:-1])
        started.clear()
    finally:
        for pod in started:
            pod.detach()
        for name in [*(f"echo-pod-{i}" for i in range(len(ECHO_PODS))), "echo-client"]:
            podman.run("pod", "rm", "--force", name, check=False)
