"""`sidecar-proxy inject`: the injected pod spec field by field, the skip rules, bad input.

Everything goes through the real command line (`proxy.cli.main`), so flags,
stdout, stderr and exit codes are what a user gets. Schema validation of the
output is in test_manifests.py.
"""

from __future__ import annotations

import http.server
import io
import json
import re
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import yaml
from k8s_objects import KINDS, POD_TEMPLATE, dump, template_copy, workload

from proxy import cli
from proxy.kube import manifests, sidecar

PROXY, INIT, VALIDATION = sidecar.PROXY_NAME, sidecar.INIT_NAME, sidecar.VALIDATION_NAME

def run(capsys, monkeypatch, text: str | None, *args: str, tmp_path=None) -> tuple[int, str, str]:
    """sidecar-proxy inject ARGS with `text` on stdin (and -f - unless -f is given)."""
    if text is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(text))
    argv = ["inject", *args]
    if "-f" not in args:
        argv += ["-f", "-"]
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def inject(capsys, monkeypatch):
    """Objects in, (injected objects, stderr) out; fails unless the exit status is 0."""
    def go(*objects: dict, args: tuple[str, ...] = ()) -> tuple[list[dict], str]:
        code, out, err = run(capsys, monkeypatch, dump(*objects), *args)
        assert code == 0, err
        return list(yaml.safe_load_all(out)), err
    return go


def pod_spec(obj: dict) -> dict:
    node = obj
    for key in manifests.pod_spec_path(obj):
        node = node[key]
    return node


def pod_meta(obj: dict) -> dict:
    node = obj
    for key in manifests.pod_spec_path(obj)[:-1]:
        node = node[key]
    return node["metadata"]


def container(spec: dict, name: str) -> dict:
    found = [c for field in ("initContainers", "containers") for c in spec.get(field, []) if c["name"] == name]
    assert len(found) == 1, f"{name}: {len(found)} containers"
    return found[0]


def env(c: dict) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c.get("env", [])}


# --- where the containers go ---------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_every_workload_kind_gets_the_init_step_and_the_proxy(inject, kind):
    [obj], err = inject(workload(kind))
    spec = pod_spec(obj)
    if kind in ("Job", "CronJob"):  # native by default: the Job can complete
        assert [c["name"] for c in spec["initContainers"]] == [INIT, VALIDATION, PROXY]
        assert [c["name"] for c in spec["containers"]] == ["app"]
        assert err == ""
    else:
        assert [c["name"] for c in spec["initContainers"]] == [INIT, VALIDATION]
        assert [c["name"] for c in spec["containers"]] == [PROXY, "app"]
    assert spec["volumes"] == [{"name": "sidecar-proxy-init-scratch", "emptyDir": {}}]
    status = yaml.safe_load(pod_meta(obj)["annotations"][sidecar.STATUS_ANNOTATION])
    assert status["method"] == "uid"
    assert status["nativeSidecar"] is (kind in ("Job", "CronJob"))


def test_the_rest_of_the_object_is_kept(inject):
    original = workload("Deployment")
    original["metadata"]["annotations"] = {"team": "shop"}
    original["spec"]["template"]["metadata"]["annotations"] = {"prometheus.io/scrape": "true"}
    original["spec"]["template"]["spec"]["serviceAccountName"] = "web"
    [obj], _ = inject(original)
    assert obj["metadata"] == original["metadata"]
    assert obj["spec"]["selector"] == original["spec"]["selector"]
    annotations = pod_meta(obj)["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations[sidecar.DEFAULT_CONTAINER_ANNOTATION] == "app"
    spec = pod_spec(obj)
    assert spec["serviceAccountName"] == "web"
    assert container(spec, "app") == original["spec"]["template"]["spec"]["containers"][0]
    assert list(spec).index("initContainers") == list(spec).index("containers") - 1


def test_a_template_without_metadata_gets_it_above_the_spec(inject):
    original = workload("Job")
    del original["spec"]["template"]["metadata"]
    [obj], _ = inject(original)
    assert list(obj["spec"]["template"]) == ["metadata", "spec"]
    assert sidecar.STATUS_ANNOTATION in obj["spec"]["template"]["metadata"]["annotations"]


def test_user_init_containers_run_before_the_redirect_in_classic_mode(inject):
    template = template_copy()
    template["spec"]["initContainers"] = [{"name": "migrate", "image": "registry.example/migrate:1"}]
    [classic], _ = inject(workload("Deployment", template=template))
    [native], _ = inject(workload("Deployment", template=template), args=("--native-sidecar",))
    # Classic: nothing would answer on 5001 before the proxy starts, so the
    # user's init containers run first. Native: the proxy is up before them.
    assert [c["name"] for c in pod_spec(classic)["initContainers"]] == ["migrate", INIT, VALIDATION]
    assert [c["name"] for c in pod_spec(native)["initContainers"]] == [INIT, VALIDATION, PROXY, "migrate"]


@pytest.mark.parametrize("method", sidecar.METHODS)
def test_the_validation_container_checks_the_init_steps_redirect(inject, method):
    """validate.sh from the init image, with the init step's arguments,
    environment and mounts; root with what validating needs, nothing else."""
    [obj], _ = inject(workload("Deployment"), args=("--method", method))
    spec = pod_spec(obj)
    init, validation = container(spec, INIT), container(spec, VALIDATION)
    assert validation["image"] == init["image"] == sidecar.DEFAULT_INIT_IMAGE
    assert validation["command"] == ["/bin/sh", "/usr/local/lib/sidecar-proxy/iptables/validate.sh"]
    assert (validation["args"], validation["env"], validation["volumeMounts"]) == \
        (init["args"], init["env"], init["volumeMounts"])
    context = validation["securityContext"]
    assert context["runAsUser"] == 0 and context["allowPrivilegeEscalation"] is False
    assert context["readOnlyRootFilesystem"] is True and context["privileged"] is False
    assert context["capabilities"] == {"drop": ["ALL"],
                                       "add": ["NET_ADMIN", "NET_RAW", "SETUID", "SETGID", "CHOWN", "KILL"]}
    status = yaml.safe_load(pod_meta(obj)["annotations"][sidecar.STATUS_ANNOTATION])
    assert status["initContainers"] == [INIT, VALIDATION]


def test_no_validation_leaves_it_out(inject):
    [obj], _ = inject(workload("Deployment"), args=("--no-validation",))
    spec = pod_spec(obj)
    assert [c["name"] for c in spec["initContainers"]] == [INIT]
    assert yaml.safe_load(pod_meta(obj)["annotations"][sidecar.STATUS_ANNOTATION])["initContainers"] == [INIT]
    [again], _ = inject(obj)
    assert again == obj, "already injected, also without the validation container"


# --- the containers, field by field ---------------------------------------------------

def test_proxy_container_runs_as_1337_with_nothing(inject):
    [obj], _ = inject(workload("Deployment"))
    proxy = container(pod_spec(obj), PROXY)
    assert proxy["image"] == sidecar.DEFAULT_IMAGE == "sidecar-proxy:0.1.0"
    assert proxy["args"] == ["run"]
    assert proxy["securityContext"] == {
        "runAsUser": 1337, "runAsGroup": 1337, "runAsNonRoot": True, "privileged": False,
        "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"},
    }
    assert "volumeMounts" not in proxy
    assert env(proxy) == {"ISTIO_PROXY_PORT": "5001", "ISTIO_PROXY_UID": "1337"}


def test_init_container_is_root_with_net_admin_and_net_raw_only(inject):
    [obj], _ = inject(workload("Deployment"))
    init = container(pod_spec(obj), INIT)
    assert init["image"] == sidecar.DEFAULT_INIT_IMAGE == "sidecar-proxy-init:0.1.0"
    assert init["args"] == ["--method", "uid"]
    assert init["securityContext"] == {
        "runAsUser": 0, "runAsGroup": 0, "runAsNonRoot": False, "privileged": False,
        "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
        # NET_RAW: iptables-legacy opens a raw socket (nft needs NET_ADMIN only).
        "capabilities": {"drop": ["ALL"], "add": ["NET_ADMIN", "NET_RAW"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    assert "restartPolicy" not in init  # runs once
    assert {m["mountPath"] for m in init["volumeMounts"]} == {"/run", "/tmp"}


@pytest.mark.parametrize("method,expected", [
    ("uid", {"ISTIO_PROXY_PORT": "5001", "ISTIO_PROXY_UID": "1337"}),
    ("mark", {"ISTIO_PROXY_PORT": "5001", "ISTIO_SO_MARK": "0x1"}),
    ("cgroup", {"ISTIO_PROXY_PORT": "5001", "ISTIO_PROXY_UID": "1337", "ISTIO_NET_CLS_ID": "0x100001",
                "POD_UID": {"fieldRef": {"fieldPath": "metadata.uid"}}}),
    ("explicit", {"ISTIO_PROXY_PORT": "5001"}),
])
def test_design_note_variables_are_the_same_in_both_containers(inject, method, expected):
    [obj], _ = inject(workload("Deployment"), args=("--method", method))
    spec = pod_spec(obj)
    assert env(container(spec, INIT)) == env(container(spec, PROXY)) == expected
    assert container(spec, INIT)["args"][:2] == ["--method", method]


def test_mark_method_gives_the_proxy_net_admin_and_the_mark(inject):
    [obj], _ = inject(workload("Deployment"), args=("--method", "mark"))
    proxy = container(pod_spec(obj), PROXY)
    assert proxy["args"] == ["run", "--mark", "$(ISTIO_SO_MARK)"]
    # Kubernetes grants no ambient capabilities, so a non-root proxy could
    # not use NET_ADMIN: UID 0 with NET_ADMIN as the only capability.
    assert proxy["securityContext"] == {
        "runAsUser": 0, "runAsGroup": 0, "runAsNonRoot": False, "privileged": False,
        "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"], "add": ["NET_ADMIN"]}, "seccompProfile": {"type": "RuntimeDefault"},
    }


def test_cgroup_method_shares_one_cgroup_directory_per_pod(inject):
    root = "/sys/fs/cgroup/net_cls,net_prio"
    [obj], _ = inject(workload("Deployment"), args=("--method", "cgroup", "--cgroup-root", root))
    spec = pod_spec(obj)
    init, proxy = container(spec, INIT), container(spec, PROXY)
    directory = "/run/sidecar-proxy/net_cls/sidecar-proxy-$(POD_UID)"
    assert init["args"] == ["--method", "cgroup", "--cgroup-dir", directory]
    # redirect.sh creates the cgroup in the hierarchy's read-only (0555) root
    # and chowns its tasks/cgroup.procs to the proxy's UID.
    assert init["securityContext"]["capabilities"]["add"] == ["NET_ADMIN", "NET_RAW", "CHOWN", "DAC_OVERRIDE"]
    assert proxy["args"] == ["run", "--cgroup", directory]
    mount = {"name": "sidecar-proxy-cgroup", "mountPath": "/run/sidecar-proxy/net_cls"}
    assert mount in init["volumeMounts"] and proxy["volumeMounts"] == [mount]
    assert {"name": "sidecar-proxy-cgroup",
            "hostPath": {"path": root, "type": "Directory"}} in spec["volumes"]
    assert proxy["securityContext"]["runAsUser"] == 1337
    assert proxy["securityContext"]["capabilities"] == {"drop": ["ALL"]}


def test_explicit_method_reads_the_services_file_from_a_configmap(inject):
    [obj], _ = inject(workload("Deployment"), args=("--method", "explicit", "--services-configmap", "web-services"))
    spec = pod_spec(obj)
    init = container(spec, INIT)
    assert init["args"] == ["--method", "explicit", "--services", "/etc/sidecar-proxy/services"]
    mount = {"name": "sidecar-proxy-services", "mountPath": "/etc/sidecar-proxy", "readOnly": True}
    assert mount in init["volumeMounts"]
    assert {"name": "sidecar-proxy-services", "configMap": {"name": "web-services"}} in spec["volumes"]
    # the proxy reads the chains the services file was made from: with no bypass
    # rule, it must never dial a listed service itself
    proxy = container(spec, PROXY)
    assert proxy["args"] == ["run", "--config", "/etc/sidecar-proxy/proxy.yaml"]
    assert proxy["volumeMounts"] == [mount]


@pytest.mark.parametrize("method", sidecar.METHODS)
def test_tproxy_gives_the_proxy_net_admin_in_the_proxys_group(inject, method):
    """Istio's TPROXY sidecar: UID 0 with NET_ADMIN alone (IP_TRANSPARENT), group 1337;
    INBOUND_INTERCEPTION_MODE in both containers, and with the uid method the group's bypass."""
    [obj], _ = inject(workload("Deployment"), args=("--method", method, "--interception-mode", "TPROXY"))
    spec = pod_spec(obj)
    init, proxy = container(spec, INIT), container(spec, PROXY)
    assert env(init) == env(proxy)
    assert env(proxy)["INBOUND_INTERCEPTION_MODE"] == "TPROXY"
    assert env(proxy).get("SIDECAR_PROXY_GID") == ("1337" if method == "uid" else None)
    context = proxy["securityContext"]
    assert (context["runAsUser"], context["runAsGroup"], context["runAsNonRoot"]) == (0, 1337, False)
    assert context["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN"]}
    assert json.loads(pod_meta(obj)["annotations"][sidecar.STATUS_ANNOTATION])["interceptionMode"] == "TPROXY"


def test_the_pods_annotation_picks_the_interception_mode(inject, capsys, monkeypatch):
    tproxy = workload("Deployment")
    tproxy["spec"]["template"].setdefault("metadata", {})["annotations"] = {sidecar.INTERCEPTION_ANNOTATION: "TPROXY"}
    redirect = workload("Deployment")
    redirect["spec"]["template"].setdefault("metadata", {})["annotations"] = {
        sidecar.INTERCEPTION_ANNOTATION: "REDIRECT"}
    [a, b], _ = inject(tproxy, redirect, args=("--interception-mode", "TPROXY"))
    assert env(container(pod_spec(a), PROXY))["INBOUND_INTERCEPTION_MODE"] == "TPROXY"
    assert "INBOUND_INTERCEPTION_MODE" not in env(container(pod_spec(b), PROXY))
    wrong = workload("Deployment")
    wrong["spec"]["template"].setdefault("metadata", {})["annotations"] = {sidecar.INTERCEPTION_ANNOTATION: "NONE"}
    code, out, err = run(capsys, monkeypatch, dump(wrong))
    assert code == 2 and out == "" and "interceptionMode: 'NONE' is not one of REDIRECT, TPROXY" in err, err
    assert len(err.strip().splitlines()) == 1


def test_tproxy_refuses_an_app_in_the_proxys_group(capsys, monkeypatch):
    obj = workload("Deployment")
    obj["spec"]["template"]["spec"]["containers"][0]["securityContext"] = {"runAsGroup": 1337}
    code, _, err = run(capsys, monkeypatch, dump(obj), "--interception-mode", "TPROXY")
    assert code == 2 and "1337 is the proxy's group with TPROXY" in err, err


# --- the contracts with the other halves: redirect.sh and `sidecar-proxy run` -----------

REDIRECT_SH = Path(__file__).resolve().parents[2] / "iptables" / "redirect.sh"
VALIDATE_SH = REDIRECT_SH.with_name("validate.sh")


@pytest.mark.parametrize("interception", sidecar.INTERCEPTION_MODES)
@pytest.mark.parametrize("method", sidecar.METHODS)
def test_redirect_sh_accepts_the_init_containers_args_and_env(inject, method, interception, tmp_path):
    """The init container's command line and environment, given to the real
    script with --dry-run (which validates everything and touches nothing)."""
    [obj], _ = inject(workload("Deployment"), args=("--method", method, "--interception-mode", interception))
    init = container(pod_spec(obj), INIT)
    services = tmp_path / "services"
    services.write_text("198.51.100.10:80\n")
    values = {e["name"]: e.get("value", "0123-uid") for e in init["env"]}
    argv = [re.sub(r"\$\((\w+)\)", lambda m: values[m[1]], a) for a in init["args"]]
    argv = [str(services) if a == "/etc/sidecar-proxy/services" else a for a in argv]
    result = subprocess.run(["sh", str(REDIRECT_SH), *argv, "--dry-run"], capture_output=True, text=True,
                            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", **values})
    assert result.returncode == 0, result.stderr
    expected = {"uid": "--uid-owner 1337", "mark": "--mark 0x1", "cgroup": "--cgroup 1048577",
                "explicit": "-d 198.51.100.10/32"}[method]
    assert expected in result.stdout and "--to-ports 5001" in result.stdout
    if interception == "TPROXY":  # the environment alone turns it on, and the group's bypass
        assert "TPROXY --on-port 5001" in result.stdout
        assert ("--gid-owner 1337" in result.stdout) == (method == "uid")
    # and validate.sh takes the same (its plan reads every option; no root needed to make it)
    validation = container(pod_spec(obj), VALIDATION)
    assert validation["args"] == init["args"]
    plan = subprocess.run(["sh", str(VALIDATE_SH), *argv, "--plan"], capture_output=True, text=True,
                          env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", **values})
    assert plan.returncode == 0, plan.stderr
    assert plan.stdout.startswith("proxy_port\t5001\n")


@pytest.mark.parametrize("method", sidecar.METHODS)
def test_proxy_args_are_what_sidecar_proxy_run_accepts(inject, method):
    [obj], _ = inject(workload("Deployment"), args=("--method", method))
    proxy = container(pod_spec(obj), PROXY)
    values = {e["name"]: e.get("value", "0123-uid") for e in proxy["env"]}
    argv = [re.sub(r"\$\((\w+)\)", lambda m: values[m[1]], a) for a in proxy["args"]]
    args = cli.build_parser().parse_args(argv)  # exits 2 on an unknown flag
    assert args.func is cli.cmd_run
    if method == "mark":
        assert args.mark == "0x1"
    if method == "cgroup":
        assert args.cgroup == "/run/sidecar-proxy/net_cls/sidecar-proxy-0123-uid"


def test_proxy_uid_flag_changes_both_sides(inject):
    [obj], _ = inject(workload("Deployment"), args=("--proxy-uid", "2000"))
    spec = pod_spec(obj)
    proxy = container(spec, PROXY)
    assert proxy["securityContext"]["runAsUser"] == proxy["securityContext"]["runAsGroup"] == 2000
    assert env(proxy)["ISTIO_PROXY_UID"] == env(container(spec, INIT))["ISTIO_PROXY_UID"] == "2000"


def test_images_flags(inject):
    [obj], _ = inject(workload("Pod"), args=("--image", "reg.example/p:1", "--init-image", "reg.example/i:1"))
    spec = pod_spec(obj)
    assert container(spec, PROXY)["image"] == "reg.example/p:1"
    assert container(spec, INIT)["image"] == "reg.example/i:1"


def test_classic_proxy_waits_for_ready_and_pauses_before_drain(inject):
    [obj], _ = inject(workload("Deployment"))
    proxy = container(pod_spec(obj), PROXY)
    assert "restartPolicy" not in proxy and "startupProbe" not in proxy
    assert proxy["readinessProbe"] == {"exec": {"command": ["python", "-c", sidecar.READY_CHECK]},
                                       "timeoutSeconds": 3, "periodSeconds": 5, "failureThreshold": 3}
    assert "http://127.0.0.1:15000/ready" in sidecar.READY_CHECK
    assert proxy["lifecycle"] == {
        "postStart": {"exec": {"command": ["python", "-c", sidecar.READY_WAIT]}},
        "preStop": {"exec": {"command": ["sleep", "5"]}},
    }


def test_native_proxy_gates_the_pod_with_a_startup_probe(inject):
    [obj], _ = inject(workload("Deployment"), args=("--native-sidecar",))
    proxy = container(pod_spec(obj), PROXY)
    assert proxy["restartPolicy"] == "Always"
    assert proxy["startupProbe"]["exec"]["command"] == ["python", "-c", sidecar.READY_CHECK]
    assert proxy["startupProbe"]["periodSeconds"] * proxy["startupProbe"]["failureThreshold"] == 60
    assert "lifecycle" not in proxy  # the kubelet stops it after the app, no pause needed
    assert sidecar.DEFAULT_CONTAINER_ANNOTATION not in pod_meta(obj)["annotations"]


def test_classic_sidecar_in_a_job_says_how_it_ends(inject):
    [obj], err = inject(workload("Job"), args=("--no-native-sidecar",))
    assert [c["name"] for c in pod_spec(obj)["containers"]] == [PROXY, "app"]
    assert "document 1 (Job job): classic sidecar in a Job" in err
    assert "POST http://127.0.0.1:15000/quitquitquit" in err


class _Admin(http.server.BaseHTTPRequestHandler):
    ready = False

    def do_GET(self):
        self.send_response(200 if self.path == "/ready" and _Admin.ready else 503)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def admin():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Admin)
    thread = threading.Thread(target=server.serve_forever, name="fake-admin", daemon=True)
    thread.start()
    _Admin.ready = False
    yield server.server_address[1]
    server.shutdown()
    server.server_close()
    thread.join()


def _snippet(code: str, port: int) -> list[str]:
    # The snippets name the admin port; point them at the fake admin instead.
    return [sys.executable, "-c", code.replace(f":{sidecar.ADMIN_PORT}/", f":{port}/")]


def test_ready_check_answers_by_exit_status(admin):
    assert subprocess.run(_snippet(sidecar.READY_CHECK, admin), capture_output=True).returncode != 0
    _Admin.ready = True
    assert subprocess.run(_snippet(sidecar.READY_CHECK, admin), capture_output=True).returncode == 0


def test_ready_wait_returns_once_ready(admin):
    waiting = subprocess.Popen(_snippet(sidecar.READY_WAIT, admin), stderr=subprocess.PIPE)
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            waiting.wait(timeout=1)  # not ready yet: still waiting
        _Admin.ready = True
        assert waiting.wait(timeout=5) == 0
    finally:
        waiting.kill()
        waiting.communicate()


# --- what is left alone ----------------------------------------------------------------

def test_idempotent(capsys, monkeypatch):
    objects = [workload(kind) for kind in KINDS]
    for method in sidecar.METHODS:
        code, once, _ = run(capsys, monkeypatch, dump(*objects), "--method", method)
        assert code == 0
        code, twice, err = run(capsys, monkeypatch, once, "--method", method)
        assert code == 0 and twice == once
        assert err.count("already injected") == len(KINDS)


def test_already_injected_by_container_name_is_left_alone(inject):
    template = template_copy()
    template["spec"]["containers"].append({"name": PROXY, "image": "sidecar-proxy:0.0.9"})
    original = workload("Deployment", template=template)
    [obj], err = inject(original)
    assert obj == original
    assert "document 1 (Deployment deployment): already injected" in err


@pytest.mark.parametrize("kind", KINDS)
def test_kube_system_is_left_alone(inject, kind):
    original = workload(kind, namespace="kube-system")
    [obj], err = inject(original)
    assert obj == original
    assert err == (f"sidecar-proxy inject: <stdin>: document 1 ({kind} kube-system/{kind.lower()}): "
                   "not injected: namespace kube-system is left alone (cluster components)\n")


def test_namespace_flag_stands_for_documents_without_one(inject):
    original = workload("Deployment")
    [obj], err = inject(original, args=("-n", "kube-system"))
    assert obj == original and "namespace kube-system is left alone" in err
    [obj], _ = inject(workload("Deployment", namespace="shop"), args=("-n", "kube-system"))
    assert PROXY in [c["name"] for c in pod_spec(obj)["containers"]]


def test_opt_out_annotation_on_the_workload_or_its_pod_template(inject):
    on_workload = workload("Deployment")
    on_workload["metadata"]["annotations"] = {"sidecar-proxy/inject": "false"}
    on_template = workload("StatefulSet")
    on_template["spec"]["template"]["metadata"]["annotations"] = {"sidecar-proxy/inject": "False"}
    on_pod = workload("Pod")
    on_pod["metadata"]["annotations"] = {"sidecar-proxy/inject": "false"}
    opted_in = workload("DaemonSet")
    opted_in["metadata"]["annotations"] = {"sidecar-proxy/inject": "true"}
    objects, err = inject(on_workload, on_template, on_pod, opted_in)
    assert objects[:3] == [on_workload, on_template, on_pod]
    assert PROXY in [c["name"] for c in pod_spec(objects[3])["containers"]]
    lines = err.splitlines()
    assert len(lines) == 3
    assert lines[0].endswith('document 1 (Deployment deployment): not injected: '
                             'annotation sidecar-proxy/inject: "false" on the Deployment')
    assert lines[1].endswith('document 2 (StatefulSet statefulset): not injected: '
                             'annotation sidecar-proxy/inject: "false" on the pod template')
    assert 'document 3 (Pod pod): not injected' in lines[2]


def test_opt_out_annotation_on_a_namespace_in_the_same_input(inject):
    namespace = {"apiVersion": "v1", "kind": "Namespace",
                 "metadata": {"name": "legacy", "annotations": {"sidecar-proxy/inject": "false"}}}
    skipped = workload("Deployment", namespace="legacy")
    objects, err = inject(skipped, namespace, workload("Deployment", namespace="shop"))
    assert objects[:2] == [skipped, namespace]
    assert PROXY in [c["name"] for c in pod_spec(objects[2])["containers"]]
    assert 'document 1 (Deployment legacy/deployment): not injected: namespace legacy has annotation' in err


def test_host_network_pods_are_left_alone(inject):
    original = workload("DaemonSet")
    original["spec"]["template"]["spec"]["hostNetwork"] = True
    [obj], err = inject(original)
    assert obj == original
    assert "hostNetwork" in err and "document 1 (DaemonSet daemonset)" in err


def test_other_kinds_pass_through_unchanged(inject):
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
               "spec": {"selector": {"app": "web"}, "ports": [{"port": 80}]}}
    config = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"},
              "data": {"when": "2024-01-01T00:00:00Z", "flag": "yes"}}
    custom = {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"},
              "spec": {"template": POD_TEMPLATE}}
    objects, err = inject(service, config, custom)
    assert objects == [service, config, custom]
    assert err == ""


def test_a_known_kind_in_an_unknown_group_is_not_touched_and_said_so(inject):
    foreign = workload("Deployment")
    foreign["apiVersion"] = "example.com/v1"
    [obj], err = inject(foreign)
    assert obj == foreign
    assert "document 1 (Deployment deployment): not injected: example.com/v1 is not an API group" in err


def test_multi_document_order_and_empty_documents(capsys, monkeypatch):
    text = "---\n" + dump(workload("Pod")) + "---\n---\n" + dump({"apiVersion": "v1", "kind": "Service",
                                                                  "metadata": {"name": "s"}})
    code, out, _ = run(capsys, monkeypatch, text)
    assert code == 0
    assert [o["kind"] for o in yaml.safe_load_all(out)] == ["Pod", "Service"]


def test_kind_list_items_are_injected(inject):
    items = [workload("Deployment"), workload("Job", namespace="kube-system")]
    listed = {"apiVersion": "v1", "kind": "List", "items": items}
    objects, err = inject(listed)
    assert [o["kind"] for o in objects] == ["Deployment", "Job"]
    assert PROXY in [c["name"] for c in pod_spec(objects[0])["containers"]]
    assert "document 1 item 2 (Job kube-system/job): not injected" in err


def test_files_and_stdin(capsys, monkeypatch, tmp_path):
    app = tmp_path / "app.yaml"
    app.write_text(dump(workload("Deployment")))
    code, from_file, _ = run(capsys, monkeypatch, None, "-f", str(app))
    assert code == 0
    code, from_stdin, _ = run(capsys, monkeypatch, app.read_text(), "-f", "-")
    assert code == 0 and from_stdin == from_file
    code, both, _ = run(capsys, monkeypatch, app.read_text(), "-f", str(app), "-f", "-")
    assert code == 0 and both == from_file + "---\n" + from_file


def test_strings_that_look_like_timestamps_stay_as_written(capsys, monkeypatch):
    text = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\ndata:\n  when: 2024-01-01T00:00:00Z\n"
    code, out, _ = run(capsys, monkeypatch, text)
    assert code == 0
    # Quoted on the way out, so any YAML reader (kubectl's too) sees the same string.
    assert yaml.safe_load(out)["data"]["when"] == "2024-01-01T00:00:00Z"


# --- bad input: one line naming the culprit, exit 2, nothing on stdout ---------------

def _with_ports(*ports: int) -> dict:
    template = template_copy()
    template["spec"]["containers"][0]["ports"] = [{"containerPort": p} for p in ports]
    return workload("Deployment", template=template)


def _running_as(uid: int, *, pod_level: bool = False) -> dict:
    template = template_copy()
    if pod_level:
        template["spec"]["securityContext"] = {"runAsUser": uid}
    else:
        template["spec"]["containers"][0]["securityContext"] = {"runAsUser": uid}
    return workload("Deployment", template=template)


GOOD = dump(workload("Pod"))
NOT_OBJECT = "not a Kubernetes object (a mapping with apiVersion and kind)"


@pytest.mark.parametrize("text,args,message", [
    (GOOD + "---\nkind: a: b\n", (),
     f"<stdin>: document 2: not valid YAML: line {GOOD.count(chr(10)) + 2}: mapping values are not allowed here"),
    (GOOD + "---\njust a string\n", (), f"<stdin>: document 2: {NOT_OBJECT}, got a string"),
    (GOOD + "---\n- a\n- list\n", (), f"<stdin>: document 2: {NOT_OBJECT}, got a list"),
    (GOOD + "---\nkind: Deployment\nmetadata: {name: x}\n", (),
     "<stdin>: document 2 (Deployment x): not a Kubernetes object: no apiVersion"),
    (GOOD + "---\napiVersion: v1\nmetadata: {name: x}\n", (), "<stdin>: document 2: not a Kubernetes object: no kind"),
    ("apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: x}\nspec: {}\n", (),
     "<stdin>: document 1 (Deployment x): spec.template: is required"),
    ("apiVersion: v1\nkind: Pod\nmetadata: {name: x}\nspec: {containers: {name: a}}\n", (),
     "<stdin>: document 1 (Pod x): spec.containers: expected a non-empty list of containers"),
    ("apiVersion: v1\nkind: List\nitems:\n- 3\n", (), "<stdin>: document 1 item 1: not a Kubernetes object"),
    (dump(_with_ports(8080, 5001)), (),
     "<stdin>: document 1 (Deployment deployment): spec.template.spec.containers[0].ports[1].containerPort: "
     "5001 is the proxy's redirected port"),
    (dump(_with_ports(15000)), (), "containers[0].ports[0].containerPort: 15000 is the proxy's admin port"),
    (dump(_running_as(1337)), (),
     "<stdin>: document 1 (Deployment deployment): spec.template.spec.containers[0].securityContext.runAsUser: "
     "1337 is the proxy's UID"),
    (dump(_running_as(1337, pod_level=True)), (),
     "spec.template.spec.securityContext.runAsUser: 1337 is the proxy's UID and containers[0] (app) inherits it"),
    (dump(_running_as(2000)), ("--proxy-uid", "2000"), "2000 is the proxy's UID"),
    # hostile input: a recursion the parser would not survive, an alias bomb
    (GOOD + "---\nspec: " + "[" * 500 + "]" * 500 + "\n", (),
     f"<stdin>: document 2: line {GOOD.count(chr(10)) + 2}: nested deeper than 100 levels"),
    ("a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{n}: &{n} [" + ", ".join([f"*{p}"] * 10) + "]\n" for p, n in zip("abcdef", "bcdefg", strict=True)), (),
     "<stdin>: document 1: line 6: more than 1000000 values once its YAML aliases are expanded"),
])
def test_bad_input(capsys, monkeypatch, text, args, message):
    code, out, err = run(capsys, monkeypatch, text, *args)
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1, err
    assert err.startswith("sidecar-proxy inject: ") and message in err


def test_the_proxy_uid_matters_only_for_the_uid_method(inject):
    objects, _ = inject(_running_as(1337), args=("--method", "mark"))
    assert PROXY in [c["name"] for c in pod_spec(objects[0])["containers"]]


def test_missing_file(capsys, monkeypatch, tmp_path):
    missing = tmp_path / "app.yaml"
    code, out, err = run(capsys, monkeypatch, None, "-f", str(missing))
    assert (code, out) == (2, "")
    assert err == f"sidecar-proxy inject: {missing}: cannot read: No such file or directory\n"


def test_an_error_late_in_the_input_writes_nothing(capsys, monkeypatch, tmp_path):
    first, second = tmp_path / "a.yaml", tmp_path / "b.yaml"
    first.write_text(dump(workload("Deployment")))
    second.write_text(textwrap.dedent("""\
        apiVersion: v1
        kind: Service
        metadata: {name: s}
        ---
        metadata: {name: broken}
        """))
    code, out, err = run(capsys, monkeypatch, None, "-f", str(first), "-f", str(second))
    assert (code, out) == (2, "")
    assert err == f"sidecar-proxy inject: {second}: document 2: not a Kubernetes object: no apiVersion\n"


def test_stdin_only_once(capsys, monkeypatch):
    code, out, err = run(capsys, monkeypatch, GOOD, "-f", "-", "-f", "-")
    assert (code, out) == (2, "") and "stdin" in err


@pytest.mark.parametrize("uid", ["0", "-1", "abc", str(2**31)])
def test_proxy_uid_must_be_a_non_root_uid(capsys, monkeypatch, uid):
    with pytest.raises(SystemExit) as exit_:
        run(capsys, monkeypatch, GOOD, "--proxy-uid", uid)
    assert exit_.value.code == 2
    assert "--proxy-uid" in capsys.readouterr().err
