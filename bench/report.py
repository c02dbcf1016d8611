"""From measurements to medians, ratios, the markdown tables and the target check.

Every ratio is the subject's median divided by the reference's median, measured
in the same run. Whether more is better depends on the metric (↑ or ↓ in its
label): a throughput ratio of 0.8 is 20% slower, a latency ratio of 1.2 is 20%
slower too.
"""

from __future__ import annotations

import math
import statistics

from . import syscalls
from .rules import VARIANTS
from .subjects import Subject
from .workloads import Metric, Workload

MATCH = 0.95  # "match": within 5% of the reference, the noise of this machine


def aggregate(runs: list[dict], subjects: list[Subject], workloads: list[Workload]) -> dict:
    """summary[workload][metric][subject] = {median, min, max, n, values}."""
    summary: dict = {}
    for w in workloads:
        summary[w.name] = {}
        for m in w.metrics:
            per_subject = {}
            for s in subjects:
                values = [r["metrics"][m.key] for r in runs
                          if r["workload"] == w.name and r["subject"] == s.name and not r.get("failed")
                          and r["metrics"].get(m.key) is not None]
                per_subject[s.name] = ({"median": statistics.median(values), "min": min(values),
                                        "max": max(values), "n": len(values), "values": values}
                                       if values else None)
            summary[w.name][m.key] = per_subject
    return summary


def better(metric: Metric, a: float, b: float) -> bool:
    return a > b if metric.better == "higher" else a < b


def best_peer(metric: Metric, cells: dict, subjects: list[Subject]) -> str | None:
    best = None
    for s in subjects:
        cell = cells.get(s.name)
        if s.is_peer and cell is not None and (best is None or better(metric, cell["median"], cells[best]["median"])):
            best = s.name
    return best


def ratios(summary: dict, subjects: list[Subject], workloads: list[Workload]) -> dict:
    """ratios[workload][metric] = {best_peer, subjects: {name: {to_direct, to_best_peer}}}."""
    out: dict = {}
    for w in workloads:
        out[w.name] = {}
        for m in w.metrics:
            cells = summary[w.name][m.key]
            peer = best_peer(m, cells, subjects)
            direct = cells.get("direct")
            entry = {"best_peer": peer, "subjects": {}}
            for s in subjects:
                cell = cells.get(s.name)
                if cell is None:
                    continue
                entry["subjects"][s.name] = {
                    "to_direct": cell["median"] / direct["median"] if direct else None,
                    "to_best_peer": cell["median"] / cells[peer]["median"] if peer else None,
                }
            out[w.name][m.key] = entry
    return out


def fmt(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "—"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def fmt_ratio(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def markdown_results(summary: dict, rat: dict, subjects: list[Subject], workloads: list[Workload]) -> str:
    """Two tables: the medians, and each subject's ratio to direct and to the best peer."""
    names = [s.name for s in subjects]
    head = "| workload | metric | " + " | ".join(names) + " | best peer |"
    sep = "|---|---|" + "---:|" * len(names) + "---|"
    values = [head, sep]
    ratio_rows = ["| workload | metric | " + " | ".join(names) + " |", "|---|---|" + "---:|" * len(names)]
    for w in workloads:
        for m in w.metrics:
            cells = summary[w.name][m.key]
            entry = rat[w.name][m.key]
            row = [fmt(cells[n]["median"]) if cells.get(n) else "—" for n in names]
            best = entry["best_peer"] or "—"
            values.append(f"| {w.title} | {m.label} {m.arrow} | " + " | ".join(row) + f" | {best} |")
            rrow = []
            for n in names:
                r = entry["subjects"].get(n)
                rrow.append("—" if r is None else f"{fmt_ratio(r['to_direct'])} / {fmt_ratio(r['to_best_peer'])}")
            ratio_rows.append(f"| {w.title} | {m.label} {m.arrow} | " + " | ".join(rrow) + " |")
    return ("Medians (↑ more is better, ↓ less is better; — : not applicable or not measured):\n\n"
            + "\n".join(values)
            + "\n\nRatios, each cell `× direct / × best peer` (subject median divided by theirs; "
              "best peer per row as above):\n\n"
            + "\n".join(ratio_rows) + "\n")


# The proxy subjects the targets are checked for: as it runs by default, and with two workers.
TARGET_SUBJECTS = ("proxy-uvloop", "proxy-uvloop-c2")
PEERS = ("envoy", "socat", "haproxy", "haproxy-splice", "pproxy")
# A relay on uvloop transports and nothing else: the floor of the proxy's design.
FLOOR = "uvloop-floor"
# The Envoy each of them is held against: the same number of workers.
ENVOY_OF = {"proxy-uvloop": "envoy", "proxy-uvloop-c2": "envoy-c2"}


def targets(summary: dict, rat: dict, workloads: list[Workload], subject: str = "proxy-uvloop",
            calls: dict | None = None) -> list[dict]:
    """The issues' targets, checked for one subject (`calls`: the syscalls part's summary)."""
    out = []

    def cell(w, key, name):
        c = summary.get(w.name, {}).get(key, {}).get(name)
        return c["median"] if c else None

    def compare(peers: tuple[str, ...], title: str, tolerance: float) -> None:
        misses, checked = [], 0
        for w in workloads:
            for m in w.metrics:
                ours = cell(w, m.key, subject)
                refs = [cell(w, m.key, p) for p in peers]
                refs = [r for r in refs if r is not None]
                if ours is None or not refs:
                    continue
                ref = max(refs) if m.better == "higher" else min(refs)
                ratio = ours / ref
                checked += 1
                ok = ratio >= tolerance if m.better == "higher" else ratio <= 1 / tolerance
                if not ok:
                    misses.append(f"{w.name} {m.label} ×{ratio:.2f}")
        if checked:  # not measured in this run: no row
            behind = f"; behind on: {', '.join(misses)}" if misses else ""
            out.append({"target": title, "met": not misses, "detail": f"{checked} metrics compared{behind}"})

    def against(w: Workload, key: str, refs: tuple[str, ...], title: str, who: str = subject) -> None:
        """`who` (the subject) at least as good as the better of `refs` on one metric (no tolerance)."""
        m = next(m for m in w.metrics if m.key == key)
        ours = cell(w, key, who)
        found = [(cell(w, key, r), r) for r in refs if cell(w, key, r) is not None]
        if ours is None or not found:
            return
        theirs, ref = max(found) if m.better == "higher" else min(found)
        ratio = ours / theirs
        out.append({"target": title, "met": ratio >= 1 if m.better == "higher" else ratio <= 1,
                    "detail": f"{fmt(ours)} vs {ref} {fmt(theirs)} {m.label}: ×{ratio:.2f}"})

    compare(("pproxy",), "ahead of pproxy on every workload", 1.0)
    compare(("socat",), "ahead of socat on every workload", 1.0)
    compare(("haproxy", "haproxy-splice"),
            f"match or beat single-threaded HAProxy (the better of the two; match = within {100 - MATCH * 100:.0f}%)",
            MATCH)
    for w in workloads:
        if w.kind == "rr_latency":
            ours, direct = cell(w, "p50_us", subject), cell(w, "p50_us", "direct")
            if ours and direct:
                peers = [r for r in (cell(w, "p50_us", p) for p in PEERS) if r]
                context = f" (best peer ×{min(peers) / direct:.2f})" if peers else ""
                out.append({"target": f"p50 latency within 1.4x of direct ({w.name})", "met": ours / direct <= 1.4,
                            "detail": f"{fmt(ours)} µs vs {fmt(direct)} µs: ×{ours / direct:.2f}{context}"})
        if w.kind == "idle":
            kib = cell(w, "kib_per_conn", subject)
            rss = cell(w, "rss_kib_per_conn", subject)
            if kib is not None:
                out.append({"target": "≤ 4 KiB per idle connection", "met": kib <= 4.0 and (rss is None or rss <= 4.0),
                            "detail": f"{fmt(kib)} KiB (Pss), {fmt(rss)} KiB (Rss) per connection"})
    bulk = []
    for w in workloads:
        if w.kind.startswith("bulk"):
            ours, direct = cell(w, "mb_per_s", subject), cell(w, "mb_per_s", "direct")
            if ours and direct:
                bulk.append((w.name, ours / direct))
    if bulk:
        out.append({"target": "≥ 0.5x direct bulk throughput", "met": all(r >= 0.5 for _, r in bulk),
                    "detail": ", ".join(f"{n} ×{r:.2f}" for n, r in bulk)})
    envoy = ENVOY_OF.get(subject)
    for w in workloads:
        if envoy and w.kind == "conn_rate":
            against(w, "cps", (envoy,), f"conn/s ≥ {envoy} ({w.name})")
            against(w, "cpu_s_per_1000", (envoy,), f"CPU per connection ≤ {envoy}'s ({w.name})")
            if subject == "proxy-uvloop":  # can the design reach it at all? (bench/floor.py)
                against(w, "cpu_s_per_1000", (envoy,), f"the design's floor: {FLOOR}'s CPU per connection ≤ "
                        f"{envoy}'s ({w.name})", who=FLOOR)
                against(w, "cpu_s_per_1000", (FLOOR,), f"no more CPU per connection than {FLOOR} ({w.name})")
        if envoy and w.kind == "rr_rate":
            against(w, "rps", (envoy,), f"req/s ≥ {envoy}'s ({w.name})")
        if w.kind == "conn_rate":
            against(w, "cps", ("haproxy", "haproxy-splice"),
                    f"stretch: conn/s ahead of HAProxy, one thread (the better of the two; {w.name})")
    extra = syscalls.missing_in(calls or {}, subject, envoy) if envoy else None
    if extra is not None:
        out.append({"target": f"no system call per connection that {envoy} does not make",
                    "met": not extra,
                    "detail": (", ".join(f"{c} {v:.2f}" for c, v in extra) + f" per connection ({envoy}: < 0.01)"
                               if extra else f"every call made ≥ {syscalls.SHOWN} times per connection, "
                                             f"{envoy} makes too")})
    for t in out:
        t["subject"] = subject
    return out


def markdown_targets(items: list[dict]) -> str:
    rows = ["| subject | target | met | detail |", "|---|---|---|---|"]
    rows += [f"| {t['subject']} | {t['target']} | {'yes' if t['met'] else 'NO'} | {t['detail']} |" for t in items]
    return "\n".join(rows) + "\n"


def markdown_rules(steps: list[dict]) -> str:
    by = {(s["rules"], s["variant"]): s for s in steps}
    counts = sorted({s["rules"] for s in steps})
    head = [f"{label} install (ms) | {label} connect first / last (µs) | {label} first echo first / last (µs)"
            for label in VARIANTS.values()]
    rows = ["| services | " + " | ".join(head) + " |", "|---:" * (1 + 3 * len(VARIANTS)) + "|"]
    for n in counts:
        cells = [f"{n:,}"]
        for variant in VARIANTS:
            s = by.get((n, variant))
            if s is None:
                cells += ["—", "—", "—"]
                continue
            cells.append(fmt(s["install_s"] * 1000))
            cells.append(f"{fmt(s['first']['connect_p50_us'])} / {fmt(s['last']['connect_p50_us'])}")
            cells.append(f"{fmt(s['first']['echo_p50_us'])} / {fmt(s['last']['echo_p50_us'])}")
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


def markdown_profile(profile: dict, top: int = 12) -> str:
    def table(entries, head, k=top):
        return [f"| {head} | |", "|---:|---|"] + [f"| {e['percent']}% | `{e['function']}` |" for e in entries[:k]]

    threads = ", ".join(f"{e['function']} {e['percent']}%" for e in profile.get("threads", []))
    rows = [(f"py-spy, {profile['samples']:,} samples of the thread holding the GIL ({threads}), the proxy "
             "(uvloop) under the connection-rate workload. Own time: the function was the innermost Python "
             "frame (the C functions it called, system calls included, count as its own); `Runner.run` as "
             "the innermost frame is the event loop's C code.\n")]
    rows += table(profile["self"], "own")
    rows += [""] + table(profile["inclusive"], "inclusive")
    rows += [""] + table(profile["by_file"], "own, per file")
    native = profile.get("native")
    if native:
        rows += ["", (f"With native frames, the event loop's thread only ({native['samples']:,} samples): "
                      "where the time lands, system calls and C included.\n")]
        rows += table(native.get("by_category", []), "own, per kind", 6)
        rows += [""] + table(native["self"], "own")
    return "\n".join(rows) + "\n"


def markdown_syscalls(summary: dict, subjects: list[str], command: str, count: int) -> str:
    """The per-connection table of the syscalls part: figures, then system calls by name."""
    names = [s for s in subjects if s in summary]
    head = "| per connection | " + " | ".join("direct (app server)" if n == "direct" else n for n in names) + " |"
    rows = [head, "|---|" + "---:|" * len(names)]

    def row(label: str, values) -> None:
        rows.append(f"| {label} | " + " | ".join(values) + " |")

    row("conn/s, the uncounted pass ↑", [fmt(summary[n]["cps"]) for n in names])
    for key, label in syscalls.FIGURES:
        row(label, [fmt(summary[n][key]) for n in names])
    calls = syscalls.shown_calls(summary)
    for call in calls:
        row(f"`{call}`", [f"{summary[n]['syscalls'].get(call, 0.0):.2f}" for n in names])
    row(f"other (each < {syscalls.SHOWN} everywhere, or unnamed)",
        [f"{syscalls.other_calls(summary[n], calls):.2f}" for n in names])
    reps = sorted({summary[n]["repetitions"] for n in names})
    errors = sum(summary[n]["errors"] for n in names)
    intro = (f"Made by `{command}`. Per connection, medians of {'/'.join(map(str, reps))} repetition(s), each on a "
             f"fresh subject: {count:,} connections ({syscalls.CLIENTS} clients: connect, 64 B, 64 B, close) with no "
             f"tracing, for CPU (/proc/PID/stat) and context switches (/proc/PID/task/*/status); then {count:,} "
             "more with `perf stat` counting, in the subject's processes and threads, the `syscalls:sys_enter_<name>` "
             "tracepoint of every call `perf trace -s` saw in a warm-up, and `raw_syscalls:sys_enter` (all calls). "
             "`direct` measures the app server (uvloop): the accepting end alone, no relay. System calls by name, "
             f"most frequent first; {errors} connection error(s).\n")
    return intro + "\n" + "\n".join(rows) + "\n"
