"""The workloads and what each one measures (sizes for the full run and --quick)."""

from __future__ import annotations

from dataclasses import dataclass

SINK, SOURCE, ECHO = 9001, 9002, 9003  # appserver.py's ports


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    better: str  # "higher" or "lower"
    relay_only: bool = False  # CPU and memory of the relay: nothing to measure for `direct`

    @property
    def arrow(self) -> str:
        return "↑" if self.better == "higher" else "↓"


@dataclass(frozen=True)
class Workload:
    name: str
    title: str
    kind: str  # loadgen.py's kind
    port: int  # the app server's port (socat's fixed relay target)
    conns: int
    seconds: float
    metrics: tuple[Metric, ...]
    max_ops: int = 10_000_000
    # all processes (client, relay, server) on one CPU: see `workloads`
    one_cpu: bool = False

    def spec(self, host: str) -> dict:
        return {"kind": self.kind, "host": host, "conns": self.conns, "seconds": self.seconds,
                "max_ops": self.max_ops}

    @property
    def estimate(self) -> float:
        """Seconds one measurement takes, before any has been timed (for the ETA)."""
        if self.kind == "idle":
            return 1.5 + self.conns / 1000 * 1.5
        return self.seconds + 1.0


MB = Metric("mb_per_s", "MB/s", "higher")
CPU_GB = Metric("cpu_s_per_gb", "CPU s/GB", "lower", relay_only=True)
P50 = Metric("p50_us", "p50 µs", "lower")
P99 = Metric("p99_us", "p99 µs", "lower")
RPS = Metric("rps", "req/s", "higher")
CPS = Metric("cps", "conn/s", "higher")
CPU_KCONN = Metric("cpu_s_per_1000", "CPU s/1000 conn", "lower", relay_only=True)
KIB_PSS = Metric("kib_per_conn", "KiB/conn (Pss)", "lower", relay_only=True)
KIB_RSS = Metric("rss_kib_per_conn", "KiB/conn (Rss)", "lower", relay_only=True)


def workloads(quick: bool) -> tuple[Workload, ...]:
    """The workloads in their order of appearance.

    The latency of one connection is measured twice. As the scheduler places
    the processes (`rr-1`), it is dominated by cross-CPU wake-ups, which cost
    some 20 µs each on a virtual machine (a 64-byte ping-pong between two
    processes: ~15 µs on one CPU, ~55 µs across two), so it depends on where
    each process happens to run. With the client, the relay and the server
    pinned to one CPU (`rr-1-onecpu`), it is the work each hop adds.
    """
    bulk = 0.5 if quick else 3.0
    short = 0.5 if quick else 3.0
    idle = 200 if quick else 5000
    return (
        Workload("bulk-up-1", "bulk upload, 1 connection", "bulk_up", SINK, 1, bulk, (MB, CPU_GB)),
        Workload("bulk-up-8", "bulk upload, 8 connections", "bulk_up", SINK, 8, bulk, (MB, CPU_GB)),
        Workload("bulk-down-1", "bulk download, 1 connection", "bulk_down", SOURCE, 1, bulk, (MB, CPU_GB)),
        Workload("bulk-down-8", "bulk download, 8 connections", "bulk_down", SOURCE, 8, bulk, (MB, CPU_GB)),
        Workload("rr-1", "64 B ping-pong, 1 connection", "rr_latency", ECHO, 1, short, (P50, P99),
                 max_ops=200_000),
        Workload("rr-1-onecpu", "64 B ping-pong, 1 connection, all on one CPU", "rr_latency", ECHO, 1, short,
                 (P50, P99), max_ops=200_000, one_cpu=True),
        Workload("rr-64", "64 B ping-pong, 64 connections", "rr_rate", ECHO, 64, short, (RPS,)),
        Workload("conn-32", "connect, 64 B, 64 B, close; 32 clients", "conn_rate", ECHO, 32, short,
                 (CPS, CPU_KCONN), max_ops=200_000),
        Workload(f"idle-{idle}", f"{idle:,} idle connections", "idle", ECHO, idle, 60.0 if not quick else 20.0,
                 (KIB_PSS, KIB_RSS)),
    )
