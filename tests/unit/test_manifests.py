"""Every manifest the project ships (deploy/*.yaml) or writes (inject) is one Kubernetes accepts.

Two layers, both offline:

1. the real Kubernetes OpenAPI schemas, strict (unknown fields are errors),
   from the `kubernetes-validate` package, which bundles them: 1.29 (the
   first release whose native sidecars are on by default, our minimum) and
   the newest it ships;
2. the pod-level rules the API server enforces in code, not in the schema
   (unique container names, mounts naming volumes, probes only on sidecar
   init containers, $(VAR) references that resolve...), checked here.

deploy/sidecar-*.yaml are golden files: exactly what `inject` writes for
deploy/app.yaml. Regenerate them with
    UPDATE_GOLDEN=1 python -m pytest tests/unit/test_manifests.py
"""

from __future__ import annotations

import io
import os
import re
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from k8s_objects import KINDS, dump, workload

from proxy import cli
from proxy.kube import manifests, sidecar

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
MIN_VERSION = "1.29"
VERSIONS = (MIN_VERSION, kubernetes_validate.latest_version())
GOLDEN = {  # file in deploy/ -> inject flags
    "sidecar-uid.yaml": (),
    "sidecar-mark.yaml": ("--method", "mark"),
    "sidecar-tproxy.yaml": ("--interception-mode", "TPROXY"),
}
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def test_the_schemas_we_rely_on_are_bundled():
    available = kubernetes_validate.utils.all_versions()
    assert any(v.startswith(MIN_VERSION + ".") for v in available), \
        f"kubernetes-validate {kubernetes_validate.version.__version__} lacks {MIN_VERSION} schemas: {available}"


def schema_errors(obj: dict) -> list[str]:
    errors = []
    for version in VERSIONS:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            errors.append(f"{obj['kind']} {obj['metadata'].get('name')} (k8s {version}): {path}: {exc.message}")
    return errors


def pod_rule_errors(obj: dict) -> list[str]:
    """The API server's pod validation that the schema cannot express."""
    path = manifests.pod_spec_path(obj)
    if path is None:
        return []
    spec = obj
    for key in path:
        spec = spec[key]
    errors: list[str] = []
    inits, apps = spec.get("initContainers", []), spec.get("containers", [])
    names = [c["name"] for c in inits + apps]
    if len(names) != len(set(names)):
        errors.append(f"container names repeat: {names}")
    volume_names = [v["name"] for v in spec.get("volumes", [])]
    if len(volume_names) != len(set(volume_names)):
        errors.append(f"volume names repeat: {volume_names}")
    for c in inits + apps:
        where = c["name"]
        if not DNS_LABEL.match(c["name"]):
            errors.append(f"{where}: not a DNS-1123 label")
        for mount in c.get("volumeMounts", []):
            if mount["name"] not in volume_names:
                errors.append(f"{where}: mount of unknown volume {mount['name']}")
        defined = [e["name"] for e in c.get("env", [])]
        for arg in c.get("command", []) + c.get("args", []):
            for ref in re.findall(r"\$\((\w+)\)", arg):
                if ref not in defined:  # Kubernetes would leave "$(X)" in the argument
                    errors.append(f"{where}: $({ref}) is not in its env")
        context = c.get("securityContext", {})
        if context.get("runAsNonRoot") and context.get("runAsUser") == 0:
            errors.append(f"{where}: runAsNonRoot with runAsUser 0 never starts")
    for c in inits:
        sidecar_like = c.get("restartPolicy") == "Always"
        if c.get("restartPolicy") not in (None, "Always"):
            errors.append(f"{c['name']}: init container restartPolicy must be Always or unset")
        for field in ("lifecycle", "livenessProbe", "readinessProbe", "startupProbe"):
            if field in c and not sidecar_like:
                errors.append(f"{c['name']}: {field} is only allowed on sidecar (restartPolicy Always) init containers")
    for c in apps:
        if "restartPolicy" in c:
            errors.append(f"{c['name']}: restartPolicy is only allowed on init containers")
    return errors


def sidecar_errors(obj: dict) -> list[str]:
    """The security facts of the injected pair, wherever they appear."""
    path = manifests.pod_spec_path(obj)
    if path is None:
        return []
    spec = obj
    for key in path:
        spec = spec[key]
    every = {c["name"]: c for c in spec.get("initContainers", []) + spec.get("containers", [])}
    if sidecar.PROXY_NAME not in every:
        return []
    errors = []
    proxy, init = every[sidecar.PROXY_NAME], every[sidecar.INIT_NAME]
    p, i = proxy["securityContext"], init["securityContext"]
    mark = p["capabilities"].get("add") == ["NET_ADMIN"]
    if not mark and (p["runAsUser"], p["runAsGroup"], p["runAsNonRoot"]) != (1337, 1337, True):
        errors.append(f"proxy identity {p}")
    if p["allowPrivilegeEscalation"] or not p["readOnlyRootFilesystem"] or p["capabilities"]["drop"] != ["ALL"]:
        errors.append(f"proxy privileges {p}")
    if not set(p["capabilities"].get("add", [])) <= {"NET_ADMIN"}:
        errors.append(f"proxy capabilities {p['capabilities']}")
    if "127.0.0.1:15000/ready" not in " ".join(proxy["readinessProbe"]["exec"]["command"]):
        errors.append("proxy readiness probe does not ask /ready on 15000")
    if (i["runAsUser"], i["runAsNonRoot"]) != (0, False) \
            or not set(i["capabilities"]["add"]) <= {"NET_ADMIN", "NET_RAW", "CHOWN", "DAC_OVERRIDE"}:
        errors.append(f"init step identity {i}")
    return errors


def all_errors(obj: dict) -> list[str]:
    return schema_errors(obj) + pod_rule_errors(obj) + sidecar_errors(obj)


def inject_text(*args: str, stdin: str | None = None, monkeypatch, capsys) -> str:
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = cli.main(["inject", *args])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


# --- what the project ships -------------------------------------------------------------

DEPLOY_FILES = sorted(DEPLOY.glob("*.yaml"))


def test_deploy_has_the_examples():
    assert {p.name for p in DEPLOY_FILES} >= {"app.yaml", *GOLDEN}


@pytest.mark.parametrize("path", DEPLOY_FILES, ids=lambda p: p.name)
def test_deploy_manifest_is_valid(path):
    objects = [o for o in yaml.safe_load_all(path.read_text()) if o is not None]
    assert objects
    errors = [e for obj in objects for e in all_errors(obj)]
    assert not errors, "\n".join(errors)
    for obj in objects:
        for c in _containers(obj):
            image = c["image"]
            pinned = ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest")
            assert pinned, f"{path.name}: {image} is not pinned"


def _containers(obj: dict) -> list[dict]:
    path = manifests.pod_spec_path(obj)
    if path is None:
        return []
    spec = obj
    for key in path:
        spec = spec[key]
    return spec.get("initContainers", []) + spec["containers"]


def golden_text(name: str, monkeypatch, capsys) -> str:
    flags = GOLDEN[name]
    monkeypatch.chdir(REPO)
    header = (f"# Generated by: sidecar-proxy inject -f deploy/app.yaml{''.join(' ' + f for f in flags)}\n"
              "# Do not edit: change deploy/app.yaml or proxy/sidecar.py and regenerate\n"
              "# (UPDATE_GOLDEN=1 python -m pytest tests/unit/test_manifests.py).\n"
              "# What each field is for: deploy/README.md.\n")
    return header + inject_text("-f", "deploy/app.yaml", *flags, monkeypatch=monkeypatch, capsys=capsys)


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_deploy_examples_are_what_inject_writes(name, monkeypatch, capsys):
    expected = golden_text(name, monkeypatch, capsys)
    if os.environ.get("UPDATE_GOLDEN"):
        (DEPLOY / name).write_text(expected)
    assert (DEPLOY / name).read_text() == expected, f"deploy/{name} is stale: regenerate it (see module docstring)"


def test_deploy_examples_show_classic_and_native_sidecars():
    objects = list(yaml.safe_load_all((DEPLOY / "sidecar-uid.yaml").read_text()))
    by_kind = {o["kind"]: o for o in objects}
    deployment = by_kind["Deployment"]["spec"]["template"]["spec"]
    job = by_kind["Job"]["spec"]["template"]["spec"]
    assert deployment["containers"][0]["name"] == sidecar.PROXY_NAME
    assert deployment["terminationGracePeriodSeconds"] >= sidecar.PRESTOP_PAUSE_SECONDS + 5 + 5  # pause + drain + slack
    assert [c["name"] for c in job["initContainers"]] == [sidecar.INIT_NAME, sidecar.VALIDATION_NAME,
                                                          sidecar.PROXY_NAME]
    assert job["initContainers"][2]["restartPolicy"] == "Always"
    mark = {o["kind"]: o for o in yaml.safe_load_all((DEPLOY / "sidecar-mark.yaml").read_text())}
    proxy = mark["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert proxy["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN"]}


# --- what inject writes -------------------------------------------------------------------

@pytest.mark.parametrize("native", ["--native-sidecar", "--no-native-sidecar"])
@pytest.mark.parametrize("method", sidecar.METHODS)
@pytest.mark.parametrize("kind", KINDS)
def test_inject_output_is_valid(kind, method, native, monkeypatch, capsys):
    out = inject_text("-f", "-", "--method", method, native, stdin=dump(workload(kind)),
                      monkeypatch=monkeypatch, capsys=capsys)
    [obj] = list(yaml.safe_load_all(out))
    assert sidecar.STATUS_ANNOTATION in out
    errors = all_errors(obj)
    assert not errors, "\n".join(errors)


def test_the_validators_catch_what_they_claim():
    """The checks above are only worth something if they fail on bad specs."""
    bad = workload("Deployment")
    bad["spec"]["template"]["spec"]["containers"][0]["restartPolicy"] = "Always"
    bad["spec"]["template"]["spec"]["containers"][0]["args"] = ["$(NOPE)"]
    bad["spec"]["template"]["spec"]["initContainers"] = [
        {"name": "app", "image": "x:1", "readinessProbe": {"exec": {"command": ["true"]}},
         "volumeMounts": [{"name": "missing", "mountPath": "/x"}]}]
    errors = "\n".join(pod_rule_errors(bad))
    for expected in ("container names repeat", "mount of unknown volume missing", "$(NOPE) is not in its env",
                     "readinessProbe is only allowed on sidecar", "restartPolicy is only allowed on init containers"):
        assert expected in errors
    unknown_field = workload("Pod")
    unknown_field["spec"]["containers"][0]["securityContex"] = {}
    assert any("securityContex" in e for e in schema_errors(unknown_field))
