"""`python -m bench`: the whole benchmark, one command.

    sudo python -m bench              # ~20 minutes: every subject x workload, 3 repetitions,
                                      # then rule scaling and system calls per connection;
                                      # results in bench/results/
    sudo python -m bench --quick      # seconds: the same, tiny and once (CI keeps it working)
    sudo python -m bench --profile    # also profile the proxy's connection path (py-spy)
    sudo python -m bench --parts soak # ten minutes of mixed load and faults (--soak-seconds N);
                                      # results in bench/results/soak.{json,md}
    sudo python -m bench --parts linger  # SO_LINGER 0 while relaying, on against off (~4 minutes);
                                      # results in bench/results/linger.{json,md}

Measurements are interleaved (each repetition runs every workload against
every subject, in a rotating order), every subject is started fresh for each
measurement, and each reported number is the median over the repetitions.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from proxy.demo.sandbox import setpriv_argv

from . import charts, linger, report, soak, syscalls
from .profile import profile_connections, py_spy, resummarise
from .rules import VARIANTS, RuleScaling
from .runner import FAILURES, measure
from .subjects import SUBJECTS, Subject, envoy_binary
from .workloads import Workload, workloads
from .world import HERE, PYTHON, ROOT, BenchWorld, signals_raise

REQUIRED_TOOLS = ("ip", "iptables", "ip6tables", "iptables-restore", "nft", "setpriv", "prlimit")
PARTS = ("matrix", "rules", "syscalls", "profile")
ALONE = ("soak", "linger")  # parts with their own results files (soak.*, linger.*), run one at a time


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes, one repetition (a smoke test)")
    p.add_argument("--reps", type=int, help="repetitions of every measurement (default 3; --quick 1)")
    p.add_argument("--subjects", help="comma-separated subset of: " + ",".join(s.name for s in SUBJECTS))
    p.add_argument("--workloads", help="comma-separated subset of the workload names")
    p.add_argument("--parts", default="matrix,rules,syscalls",
                   help="what to run, of: matrix (subjects x workloads), rules (rule scaling), syscalls "
                        "(system calls, CPU and context switches per connection; perf), profile "
                        "(default matrix,rules,syscalls); or one alone of: soak (mixed load and faults, "
                        "--soak-seconds), linger (the cost of the reset on a worker's death)")
    p.add_argument("--profile", action="store_true", help="add the profile part (py-spy)")
    p.add_argument("--soak-seconds", type=float, default=600.0,
                   help="--parts soak: how long the load runs (default 600: ten minutes)")
    p.add_argument("--fault-every", type=float, default=5.0,
                   help="--parts soak: seconds between two injected faults (default 5)")
    p.add_argument("--out", help="output directory (default bench/results, --quick: bench/results/quick)")
    p.add_argument("--seed", type=int, default=0, help="rotation of the subject order (default 0)")
    p.add_argument("--render", metavar="JSON",
                   help="measure nothing: redo the tables and charts of an earlier run's latest.json")
    args = p.parse_args(argv)
    args.parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    if args.profile and "profile" not in args.parts:
        args.parts.append("profile")
    bad = [x for x in args.parts if x not in PARTS + ALONE]
    if bad:
        p.error(f"--parts: unknown {', '.join(bad)} (choose from {', '.join(PARTS + ALONE)})")
    if any(x in ALONE for x in args.parts) and len(args.parts) > 1:
        p.error(f"--parts: {next(x for x in args.parts if x in ALONE)} runs alone, with no other part")
    if args.soak_seconds <= 0 or args.fault_every <= 0:
        p.error("--soak-seconds and --fault-every must be positive")
    if args.reps is None:
        args.reps = 1 if args.quick else 3
    if args.reps < 1:
        p.error("--reps must be at least 1")
    if args.out is None and not args.render:
        args.out = str(HERE / "results" / ("quick" if args.quick else ""))
    return args


def pick(names: str | None, items, what: str):
    if not names:
        return list(items)
    by = {i.name: i for i in items}
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in by]
    if unknown:
        raise SystemExit(f"bench: unknown {what}: {', '.join(unknown)} (known: {', '.join(by)})")
    return [by[n] for n in wanted]


def preflight(subjects: list[Subject], parts: list[str]) -> None:
    """Fail early, naming what is missing."""
    if os.geteuid() != 0:
        raise SystemExit("bench: needs root (network namespaces, iptables): sudo python -m bench")
    problems = [f"tool {t}" for t in REQUIRED_TOOLS if shutil.which(t) is None]
    for s in subjects:
        problems += [f"{m} (for {s.name})" for m in s.missing()]
    if "profile" in parts and py_spy() is None:
        problems.append("py-spy (for --profile; pip install py-spy)")
    if "syscalls" in parts:
        why = syscalls.perf_can_count()
        if why:
            problems.append(f"{why} (for --parts syscalls)")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        problems.append("python module matplotlib (the bench extra)")
    probe = subprocess.run([*setpriv_argv(), PYTHON, "-c", "import proxy, uvloop"], capture_output=True,
                           text=True, cwd="/", check=False)
    if probe.returncode != 0:
        problems.append(f"UID 1337 cannot run {PYTHON} with the proxy installed")
    if problems:
        raise SystemExit("bench: missing: " + "; ".join(problems)
                         + " (apt: socat haproxy nftables iptables iproute2 util-linux linux-perf; "
                           "pip: the project's bench extra)")


class Progress:
    """What runs now, how far along, and an ETA, on stderr."""

    def __init__(self, total: int) -> None:
        self.total, self.done, self.start = total, 0, time.monotonic()
        self.durations: dict[str, list[float]] = {}

    def estimate(self, key: str, default: float) -> float:
        seen = self.durations.get(key)
        return sum(seen) / len(seen) if seen else default

    def begin(self, label: str, remaining: float) -> float:
        elapsed = time.monotonic() - self.start
        pct = 100 * self.done / max(1, self.total)
        print(f"[{self.done + 1:>3}/{self.total} {pct:3.0f}%] {label:<48} "
              f"elapsed {_clock(elapsed)}, ETA {_clock(remaining)}", file=sys.stderr, flush=True)
        return time.monotonic()

    def end(self, key: str, started: float, outcome: str) -> None:
        took = time.monotonic() - started
        self.durations.setdefault(key, []).append(took)
        self.done += 1
        print(f"          {outcome} ({took:.1f}s)", file=sys.stderr, flush=True)


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s"


def log(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def versions() -> dict:
    def first_line(cmd):
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False)
            return (out.stdout or out.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            return None

    def dist(name):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None
    socat = first_line(["socat", "-V"])
    try:
        lines = subprocess.run(["socat", "-V"], capture_output=True, text=True, check=False).stdout.splitlines()
        socat = next(line for line in lines if "socat version" in line).strip()
    except (OSError, StopIteration):
        pass
    git = first_line(["git", "-C", str(ROOT), "describe", "--always", "--dirty"])
    envoy = envoy_binary()
    # "<path>  version: <commit>/1.40.0/Clean/RELEASE/BoringSSL"
    envoy_line = first_line([envoy, "--version"]) if envoy else None
    found = re.search(r"version: \S+?/(\d[\w.-]*)/", envoy_line or "")
    envoy_version = found.group(1) if found else envoy_line
    return {"python": platform.python_version(), "uvloop": dist("uvloop"), "pproxy": dist("pproxy"),
            "haproxy": first_line(["haproxy", "-v"]), "socat": socat, "envoy": envoy_version,
            "kernel": platform.release(), "cpus": os.cpu_count(), "sidecar_proxy_git": git}


def describe(value: float | None, label: str) -> str:
    return f"{report.fmt(value)} {label}"


@dataclass
class Results:
    """What one run measured, part by part, and what failed."""

    runs: list[dict] = field(default_factory=list)
    rules: list[dict] = field(default_factory=list)
    syscalls: list[dict] = field(default_factory=list)
    profile: dict | None = None
    failures: list[str] = field(default_factory=list)


@dataclass
class Step:
    """One measurement: `work(world)` does it, records its result and returns the line to print.

    A failure (FAILURES) is recorded under `name` and, if given, by `failed(error)`;
    it never loses the run."""

    key: str  # what progress estimates the duration of steps by
    estimate: float  # seconds, before any step of the key was timed
    label: str
    name: str
    work: Callable[[BenchWorld], str]
    failed: Callable[[str], None] | None = None


def plan(args: argparse.Namespace, subjects: list[Subject], loads: list[Workload], results: Results) -> list[Step]:
    """Every step of the run, in order: the matrix, rule scaling, system calls, the profile."""
    steps: list[Step] = []
    if "matrix" in args.parts:
        for rep in range(args.reps):
            for wi, w in enumerate(loads):
                k = (rep + wi + args.seed) % len(subjects)
                for s in subjects[k:] + subjects[:k]:  # rotate: nobody always runs first
                    steps.append(_matrix_step(args, rep, w, s, results))
    if "rules" in args.parts:
        counts = (1, 10) if args.quick else (1, 100, 1000, 10000)
        scaling: list[RuleScaling] = []  # made with the first step, in the world

        def rule_step(n: int, variant: str) -> Callable[[BenchWorld], str]:
            def work(world: BenchWorld) -> str:
                if not scaling:
                    scaling.append(RuleScaling(world, counts, installs=1 if args.quick else 3,
                                               samples=20 if args.quick else 1000, seconds=5 if args.quick else 15))
                step = scaling[0].run_step(n, variant)
                results.rules.append(step)
                return (f"install {step['install_s'] * 1000:.0f} ms, connect p50 first "
                        f"{step['first']['connect_p50_us']:.1f} µs / last {step['last']['connect_p50_us']:.1f} µs")
            return work

        steps += [Step("rules", 2.0 if args.quick else 8.0, f"rule scaling: {n:,} services · {v}", f"rules {n} {v}",
                       rule_step(n, v)) for n in counts for v in VARIANTS]
    if "syscalls" in args.parts:
        chosen = [s for s in subjects if s.name in syscalls.SUBJECTS]
        for rep in range(args.reps):
            k = (rep + args.seed) % max(1, len(chosen))
            steps += [_syscalls_step(args, rep, s, results) for s in chosen[k:] + chosen[:k]]
    if "profile" in args.parts:
        seconds = 2 if args.quick else 6

        def profile(world: BenchWorld) -> str:
            results.profile = found = profile_connections(world, args.out, seconds, log)
            top = found["self"][0] if found["self"] else {"function": "?", "percent": 0}
            return f"{found['samples']} samples; top: {top['function']} {top['percent']}%"

        steps.append(Step("profile", 2 * seconds + 8.0, "profile: proxy-uvloop under conn-32 (py-spy)", "profile",
                          profile))
    return steps


def _matrix_step(args: argparse.Namespace, rep: int, w: Workload, s: Subject, results: Results) -> Step:
    record = {"subject": s.name, "workload": w.name, "rep": rep}
    results.runs.append(record)

    def work(world: BenchWorld) -> str:
        started = time.monotonic()
        result = measure(world, s, w)
        record.update(result, seconds=round(time.monotonic() - started, 2))
        outcome = ", ".join(describe(result["metrics"][m.key], m.label) for m in w.metrics
                            if result["metrics"][m.key] is not None) or "n/a"
        return outcome + (f"  [{result['errors']} connection errors]" if result["errors"] else "")

    def failed(error: str) -> None:
        record.update(failed=True, error=error, metrics={m.key: None for m in w.metrics})

    return Step(w.name, w.estimate, f"rep {rep + 1}/{args.reps} {w.name} · {s.name}", f"{w.name} · {s.name}",
                work, failed)


def _syscalls_step(args: argparse.Namespace, rep: int, s: Subject, results: Results) -> Step:
    record = {"subject": s.name, "rep": rep}
    results.syscalls.append(record)

    def work(world: BenchWorld) -> str:
        record.update(syscalls.measure(world, s, syscalls.connections(args.quick)))
        return (f"{record['syscalls_total']:.1f} system calls, {record['user_us'] + record['system_us']:.0f} µs CPU, "
                f"{record['voluntary'] + record['involuntary']:.1f} context switches per connection")

    return Step("syscalls", 3.0 if args.quick else 15.0, f"rep {rep + 1}/{args.reps} syscalls · {s.name}",
                f"syscalls · {s.name}", work, lambda error: record.update(failed=True, error=error))


def run(args: argparse.Namespace) -> int:
    if args.parts in (["soak"], ["linger"]):
        preflight([], args.parts)
        command = "python -m bench " + " ".join(sys.argv[1:])
        with signals_raise():
            try:
                if args.parts == ["soak"]:
                    return soak.main(args.out, args.soak_seconds, args.fault_every, log, command)
                return linger.main(args.out, 4 if args.quick else 10, 2.0 if args.quick else 5.0, log, command)
            except KeyboardInterrupt:
                log("interrupted: cleaned up")
                return 130
    subjects = pick(args.subjects, SUBJECTS, "subject")
    loads: list[Workload] = pick(args.workloads, workloads(args.quick), "workload")
    preflight(subjects, args.parts)
    os.makedirs(args.out, exist_ok=True)
    results = Results()
    steps = plan(args, subjects, loads, results)
    progress = Progress(len(steps))
    started = datetime.datetime.now(datetime.UTC)
    log(f"{len(subjects)} subjects x {len(loads)} workloads x {args.reps} repetition(s), parts "
        f"{', '.join(args.parts)}; results in {args.out}")
    world = None
    with signals_raise():
        try:
            world = BenchWorld()
            for i, step in enumerate(steps):
                eta = sum(progress.estimate(later.key, later.estimate) for later in steps[i:])
                t = progress.begin(step.label, eta)
                try:
                    outcome = step.work(world)
                except FAILURES as exc:  # one failed measurement must not lose the run
                    results.failures.append(f"{step.name}: {exc}")
                    if step.failed is not None:
                        step.failed(f"{type(exc).__name__}: {exc}")
                    outcome = f"FAILED: {exc}"
                progress.end(step.key, t, outcome)
        except KeyboardInterrupt:
            log("interrupted: cleaning up")
            return 130
        finally:
            if world is not None:
                world.close()
    write_outputs(document(args, started, subjects, loads, results), subjects, loads, args.out)
    if results.failures:
        log(f"{len(results.failures)} failure(s):\n  " + "\n  ".join(results.failures))
        return 1
    return 0


def document(args: argparse.Namespace, started: datetime.datetime, subjects: list[Subject],
             loads: list[Workload], results: Results) -> dict:
    """The run as latest.json holds it."""
    finished = datetime.datetime.now(datetime.UTC)
    meta = {"started": started.isoformat(timespec="seconds"), "finished": finished.isoformat(timespec="seconds"),
            "duration_s": round((finished - started).total_seconds(), 1), "quick": args.quick,
            "repetitions": args.reps, "parts": args.parts, "versions": versions(),
            "command": "python -m bench " + " ".join(sys.argv[1:])}
    return {
        "meta": meta,
        "subjects": [{"name": s.name, "kind": s.kind, "description": s.description, "peer": s.is_peer}
                     for s in subjects],
        "workloads": [{"name": w.name, "title": w.title, "kind": w.kind, "connections": w.conns,
                       "seconds": w.seconds,
                       "metrics": [{"key": m.key, "label": m.label, "better": m.better, "relay_only": m.relay_only}
                                   for m in w.metrics]} for w in loads],
        "runs": results.runs,
        "rules": results.rules,
        "syscalls": ({"connections": syscalls.connections(args.quick), "clients": syscalls.CLIENTS,
                      "runs": results.syscalls} if results.syscalls else None),
        "profile": results.profile,
        "failures": results.failures,
    }


def write_outputs(doc: dict, subjects: list[Subject], loads: list[Workload], out: str) -> None:
    """Medians, ratios and targets into `doc`; then latest.json, results.md and the charts."""
    summary = report.aggregate(doc["runs"], subjects, loads)
    rat = report.ratios(summary, subjects, loads)
    calls = doc.get("syscalls")
    if calls:
        calls["summary"] = syscalls.summarise(calls["runs"])
    present = {s.name for s in subjects}
    goals = [t for name in report.TARGET_SUBJECTS if name in present
             for t in report.targets(summary, rat, loads, subject=name, calls=calls and calls["summary"])]
    doc.update(summary=summary, ratios=rat, targets=goals)
    meta = doc["meta"]
    with open(os.path.join(out, "latest.json"), "w") as f:
        json.dump(doc, f, indent=1, allow_nan=False)
    subtitle = (f"sidecar-proxy bench, {meta['started']}, {meta['versions']['cpus']} CPUs, kernel "
                f"{meta['versions']['kernel']}, medians of {meta['repetitions']}{' (quick)' if meta['quick'] else ''}")
    md = markdown(doc, summary, rat, subjects, loads, goals, doc["rules"], doc["profile"])
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(md)
    pngs = charts.draw(summary, subjects, loads, doc["rules"], doc["profile"], out, subtitle,
                       calls=calls and calls["summary"])
    print(md)
    log(f"wrote {os.path.join(out, 'latest.json')}, results.md and {len(pngs)} charts "
        f"({meta['duration_s'] / 60:.1f} min of measuring)")


def render(path: str, out: str | None) -> int:
    """Redo the tables and charts of an earlier run from its JSON (and its py-spy files), measuring nothing."""
    with open(path) as f:
        doc = json.load(f)
    out = out or os.path.dirname(os.path.abspath(path))
    names = [s["name"] for s in doc["subjects"]]
    subjects = [s for s in SUBJECTS if s.name in names]
    by_name = {w.name: w for w in workloads(doc["meta"]["quick"])}
    loads = [by_name[w["name"]] for w in doc["workloads"]]
    if doc.get("profile"):
        doc["profile"] = resummarise(doc["profile"], os.path.dirname(os.path.abspath(path)))
    write_outputs(doc, subjects, loads, out)
    return 0


def markdown(doc, summary, rat, subjects, loads, goals, rule_steps, profile) -> str:
    meta = doc["meta"]
    v = meta["versions"]
    parts = [f"# sidecar-proxy benchmark{' (quick)' if meta['quick'] else ''}\n",
             (f"{meta['started']}, {meta['duration_s'] / 60:.1f} min; {v['cpus']} CPUs, kernel {v['kernel']}, "
              f"Python {v['python']}, uvloop {v['uvloop']}; Envoy {v.get('envoy')}; {v['haproxy']}; {v['socat']}; "
              f"pproxy {v['pproxy']}; "
              f"medians of {meta['repetitions']} repetition(s), subjects interleaved, each started fresh.\n")]
    if doc["runs"]:
        parts += ["## Subjects against the physical limit and the peers\n",
                  report.markdown_results(summary, rat, subjects, loads)]
    if goals:
        parts += ["## Targets (the proxy as it runs by default, and with two workers)\n",
                  report.markdown_targets(goals)]
    calls = doc.get("syscalls")
    if calls and calls["summary"]:
        parts += ["## System calls, CPU and context switches per connection\n",
                  report.markdown_syscalls(calls["summary"], [s.name for s in subjects], meta["command"],
                                           calls["connections"])]
    if rule_steps:
        parts += ["## Rule scaling: the explicit method, iptables rules vs an nftables set\n",
                  ("connect() p50 to the service of the first rule and of the last one; first echo: connect "
                   "plus a 64-byte round trip through the proxy (whose own upstream connection walks the "
                   "rules too).\n"),
                  report.markdown_rules(rule_steps)]
    if profile:
        parts += ["## Profile: the proxy's connection path (py-spy)\n", report.markdown_profile(profile)]
    if doc["failures"]:
        parts += ["## Failures\n", "\n".join(f"- {f}" for f in doc["failures"]) + "\n"]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render:
        return render(args.render, args.out)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
