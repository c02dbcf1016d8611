"""CPU time and memory of a subject, from /proc (the subject and its children).

CPU: utime + stime of every live process of the tree, plus cutime + cstime
(children already reaped: socat's per-connection forks end up there), so the
difference of two readings is the CPU the subject used in between, threads
included (the proxy's access-log writer runs in a thread).

Memory: Rss and Pss of every process of the tree (smaps_rollup). For a single
process the two deltas are the same thing (new private pages); for a relay
that forks per connection, Pss shares the pages the forks have in common
instead of counting them once per fork, so the per-connection figure uses Pss.
"""

from __future__ import annotations

import os

from .world import descendants

CLK_TCK = os.sysconf("SC_CLK_TCK")


def tree(pid: int) -> list[int]:
    return [pid, *descendants(pid)]


def cpu_seconds(pid: int) -> float:
    total = 0
    for p in tree(pid):
        try:
            with open(f"/proc/{p}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(b")") + 2:].split()
        # fields[0] is field 3 (state): utime, stime, cutime, cstime are fields 14-17
        total += sum(int(x) for x in fields[11:15])
    return total / CLK_TCK


def memory_kib(pid: int) -> dict[str, int]:
    """{"rss": KiB, "pss": KiB} summed over the process tree."""
    rss = pss = 0
    for p in tree(pid):
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Rss:"):
                        rss += int(line.split()[1])
                    elif line.startswith("Pss:"):
                        pss += int(line.split()[1])
        except OSError:
            continue
    return {"rss": rss, "pss": pss, "processes": len(tree(pid))}
