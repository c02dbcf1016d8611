"""The layout's promises (README "Layout"), checked on the real modules.

- The data path imports nothing outside proxy/datapath and proxy/config, and
  the configuration nothing outside proxy/config: each module is imported in
  a fresh interpreter and the proxy modules that came with it are listed.
  The source is read too, so an import inside a function counts as well.
- `explain` (a tool) takes from the data path only its pure decisions (chain
  selection, the pod's addresses).
- Nothing the running proxy imports (config, datapath, control, admin, cli)
  reaches the tools (proxy/kube, proxy/demo, proxy/explain).
- The runtime image's build context (.dockerignore) leaves the tools out, and
  the proxy still runs there; the tools' commands say in one line that they
  are not installed.
"""

from __future__ import annotations

import ast
import fnmatch
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PROXY = REPO / "proxy"

# folder -> the proxy packages its modules may import (besides the package root)
ALLOWED = {
    "config": ("proxy.config",),
    "datapath": ("proxy.datapath", "proxy.config"),
    # a tool that reads rules and configs: the data path's pure decisions
    # (chain selection, the pod's addresses), never the running proxy's parts
    "explain": ("proxy.explain", "proxy.config", "proxy.datapath.chains", "proxy.datapath.localaddrs",
                "proxy.exitcodes"),
}
RUNTIME = ("proxy.config", "proxy.datapath", "proxy.control", "proxy.admin", "proxy.cli")
TOOLS = ("proxy.kube", "proxy.demo", "proxy.explain")


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules_in(folder: str) -> list[str]:
    return sorted(module_name(p) for p in (PROXY / folder).rglob("*.py"))


def loaded_with(module: str) -> list[str]:
    """The proxy modules a fresh interpreter holds after importing `module`."""
    code = f"import sys, json, {module}; print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] == 'proxy')))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def imported_names(path: Path) -> set[str]:
    """Every proxy module a source file imports, wherever the import statement is."""
    names: set[str] = set()
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names.add(target)
            names.update(f"{target}.{a.name}" for a in node.names)  # `from . import x` names a module
    return {n for n in names if n.split(".")[0] == "proxy"}


def allowed(name: str, prefixes: tuple[str, ...]) -> bool:
    """`name` is one of `prefixes`, inside one, or a package holding one (its __init__ loads first)."""
    return name == "proxy" or any(name == p or name.startswith(p + ".") or p.startswith(name + ".")
                                  for p in prefixes)


@pytest.mark.parametrize("folder", sorted(ALLOWED))
def test_a_folder_imports_only_what_it_may(folder):
    for module in modules_in(folder):
        outside = [m for m in loaded_with(module) if not allowed(m, ALLOWED[folder])]
        assert not outside, f"importing {module} loads {outside}"
        source = PROXY.joinpath(*module.split(".")[1:])
        path = source / "__init__.py" if source.is_dir() else source.with_suffix(".py")
        outside = sorted(n for n in imported_names(path) if not allowed(n, ALLOWED[folder])
                         and not _is_attribute(n))
        assert not outside, f"{path.relative_to(REPO)} imports {outside}"


def _is_attribute(name: str) -> bool:
    """`from .x import Name`: Name is a class or function, not a module."""
    return name.rpartition(".")[2][:1].isupper() or not _is_module(name)


def _is_module(name: str) -> bool:
    parts = name.split(".")[1:]
    path = PROXY.joinpath(*parts)
    return path.is_dir() or path.with_suffix(".py").is_file()


def test_the_running_proxy_never_reaches_the_tools():
    for module in [*(m for folder in ("config", "datapath", "control", "admin") for m in modules_in(folder)),
                   "proxy.envoy_cli"]:
        tools = [m for m in loaded_with(module) if m.startswith(TOOLS)]
        assert not tools, f"importing {module} loads {tools}"
    for path in [*PROXY.glob("config/**/*.py"), *PROXY.glob("datapath/**/*.py"), *PROXY.glob("control/**/*.py"),
                 *PROXY.glob("admin/**/*.py")]:
        tools = sorted(n for n in imported_names(path) if n.startswith(TOOLS))
        assert not tools, f"{path.relative_to(REPO)} imports {tools}"


def _runtime_copy(dest: Path) -> Path:
    """proxy/ as the image's build context has it (.dockerignore applied)."""
    patterns = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]

    def ignore(directory: str, names: list[str]) -> set[str]:
        rel = Path(directory).relative_to(REPO)
        return {n for n in names for p in patterns
                if fnmatch.fnmatch((rel / n).as_posix(), p) or fnmatch.fnmatch(n, p.removeprefix("**/"))}

    shutil.copytree(PROXY, dest / "proxy", ignore=ignore)
    return dest


def test_the_runtime_image_leaves_the_tools_out_and_still_runs(tmp_path):
    root = _runtime_copy(tmp_path)
    assert not any((root / "proxy" / tool).exists() for tool in ("kube", "demo", "explain"))
    assert (root / "proxy" / "datapath" / "relay.py").is_file()
    check = subprocess.run([sys.executable, "-m", "proxy", "check"], cwd=root, capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    assert "'[::]:5001'" in check.stdout
    for tool in ("inject", "demo", "services", "explain"):
        out = subprocess.run([sys.executable, "-m", "proxy", tool, "-f", "app.yaml"], cwd=root,
                             capture_output=True, text=True)
        assert out.returncode == 2
        assert out.stderr.count("\n") == 1 and "not part of this installation" in out.stderr, out.stderr
