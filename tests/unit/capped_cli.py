"""`sidecar-proxy` commands run as a user runs them, each under a CPU and memory cap, fast.

A fresh interpreter per command costs a third of a second, too much for a
fuzz test. So one helper process imports the CLI once (`python capped_cli.py`,
started by `CappedCli`), and for each command forks a child that sets its caps
(RLIMIT_CPU, RLIMIT_AS), points stdout and stderr at files of its own, runs
`proxy.cli.main(argv)` and exits with its status, as `python -m proxy` would.
An exception that escapes is printed as the interpreter would (a traceback,
exit 1), so the caller sees what a user would.

The helper reads one JSON request per line on stdin ({"argv": [...]}) and
answers one per line on stdout ({"status": N, "signal": S, "stdout": ...,
"stderr": ...}).
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import traceback

CPU_SECONDS = 2
MEMORY_BYTES = 256 << 20
WALL_SECONDS = 30  # a guard against a command that waits for something (it never should)


def _child(argv: list[str], out: int, err: int) -> None:
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)  # not the helper's requests
    os.dup2(out, 1)
    os.dup2(err, 2)
    resource.setrlimit(resource.RLIMIT_CPU, (CPU_SECONDS, CPU_SECONDS))
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_BYTES, MEMORY_BYTES))
    signal.alarm(WALL_SECONDS)
    status = 1
    try:
        from proxy.cli import main
        status = main(argv)
    except SystemExit as exc:  # argparse's usage errors
        status = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)


def _serve() -> None:
    import proxy.cli  # noqa: F401  (imported once, here; every child has it)
    for line in sys.stdin:
        argv = json.loads(line)["argv"]
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            pid = os.fork()
            if pid == 0:
                _child(argv, out.fileno(), err.fileno())
            _, wait_status = os.waitpid(pid, 0)
            answer = {"status": os.waitstatus_to_exitcode(wait_status)}
            for name, f in (("stdout", out), ("stderr", err)):
                f.seek(0)
                answer[name] = f.read().decode(errors="replace")
        print(json.dumps(answer), flush=True)


class CappedCli:
    """The helper process, from the test's side."""

    def __init__(self, root: str, cwd: str) -> None:
        """`root`: where the proxy package to test is; `cwd`: where the commands run."""
        self.proc = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, cwd=cwd, env={**os.environ, "PYTHONPATH": root})

    def run(self, *argv: str) -> tuple[int, str, str]:
        """(exit status, or minus the signal that ended it; stdout; stderr)"""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"argv": list(argv)}) + "\n")
        self.proc.stdin.flush()
        answer = json.loads(self.proc.stdout.readline())
        return answer["status"], answer["stdout"], answer["stderr"]

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


if __name__ == "__main__":
    _serve()
