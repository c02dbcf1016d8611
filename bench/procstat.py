"""CPU time, context switches and memory of a subject, from /proc (the subject and its children).

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
    return sum(cpu_split(pid))


def cpu_split(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of the tree, reaped children included."""
    user = system = 0
    for p in tree(pid):
        try:
            with open(f"/proc/{p}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(b")") + 2:].split()
        # fields[0] is field 3 (state): utime, stime, cutime, cstime are fields 14-17
        utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
        user += utime + cutime
        system += stime + cstime
    return user / CLK_TCK, system / CLK_TCK


def _fields(path: str, *keys: str) -> list[int]:
    """The numbers after `key:` in a /proc file of "key: value" lines (0 if it is gone)."""
    found = dict.fromkeys(keys, 0)
    try:
        with open(path) as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in found:
                    found[key] = int(rest.split()[0])
    except OSError:
        pass
    return list(found.values())


def memory_kib(pid: int) -> dict[str, int]:
    """{"rss": KiB, "pss": KiB} summed over the process tree."""
    rss = pss = 0
    for p in tree(pid):
        r, s = _fields(f"/proc/{p}/smaps_rollup", "Rss", "Pss")
        rss, pss = rss + r, pss + s
    return {"rss": rss, "pss": pss, "processes": len(tree(pid))}


def context_switches(pid: int) -> tuple[int, int]:
    """(voluntary, involuntary) context switches of every live thread of the tree.

    A thread that waits (in epoll_wait, for a lock) switches voluntarily; one
    that the scheduler takes the CPU from, involuntarily. Threads that have
    ended are not counted: every subject here keeps its threads.
    """
    voluntary = involuntary = 0
    for p in tree(pid):
        try:
            tids = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for tid in tids:
            v, i = _fields(f"/proc/{p}/task/{tid}/status", "voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")
            voluntary, involuntary = voluntary + v, involuntary + i
    return voluntary, involuntary
