"""PNG charts of a run (matplotlib, the `bench` extra): medians, with min-max whiskers."""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from . import syscalls
from .rules import VARIANTS
from .subjects import Subject
from .workloads import Workload

COLOURS = {"direct": "#555555", "proxy-uvloop": "#1f77b4", "proxy-uvloop-c2": "#08306b", "proxy-uvloop-copy": "#9ecae1",
           "proxy-asyncio": "#6baed6", "envoy": "#ff7f0e", "envoy-c2": "#a05000", "socat": "#9467bd",
           "haproxy": "#d62728", "haproxy-splice": "#ff9896", "pproxy": "#2ca02c"}


def _bars(ax, groups: list[str], subjects: list[str], cells, ylabel: str, title: str) -> None:
    """Grouped bars: one group per label in `groups`, one bar per subject."""
    width = 0.8 / max(1, len(subjects))
    for i, name in enumerate(subjects):
        xs, heights, lo, hi = [], [], [], []
        for g, group in enumerate(groups):
            cell = cells(group, name)
            if cell is None:
                continue
            xs.append(g + (i - (len(subjects) - 1) / 2) * width)
            heights.append(cell["median"])
            lo.append(cell["median"] - cell["min"])
            hi.append(cell["max"] - cell["median"])
        if xs:
            ax.bar(xs, heights, width, yerr=[lo, hi], capsize=2, label=name, color=COLOURS.get(name))
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)


def _cells(summary: dict, key: str):
    def get(workload: str, subject: str):
        return summary.get(workload, {}).get(key, {}).get(subject)
    return get


def draw(summary: dict, subjects: list[Subject], workloads: list[Workload], rules: list[dict] | None,
         profile: dict | None, out_dir: str, subtitle: str, calls: dict | None = None) -> list[str]:
    names = [s.name for s in subjects]
    relays = [s.name for s in subjects if s.kind != "direct"]
    by_kind = {}
    for w in workloads:
        by_kind.setdefault(w.kind, []).append(w)
    paths = []

    def save(fig, name: str, legend: bool = True) -> None:
        if legend:  # one legend for the figure, below the axes, so it hides no bar
            handles, labels = {}, []
            for ax in fig.axes:
                for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
                    if lab not in handles:
                        handles[lab] = h
                        labels.append(lab)
            if labels:
                fig.legend([handles[lab] for lab in labels], labels, loc="lower center",
                           ncol=min(7, len(labels)), fontsize=8, frameon=False)
        fig.suptitle(subtitle, fontsize=8)
        fig.tight_layout(rect=(0, 0.07 if legend else 0, 1, 0.97))
        path = os.path.join(out_dir, name)
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        paths.append(path)

    bulk = [w.name for w in workloads if w.kind.startswith("bulk")]
    if bulk:
        fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
        _bars(axes[0], bulk, names, _cells(summary, "mb_per_s"), "MB/s (more is better)", "Bulk throughput")
        _bars(axes[1], bulk, relays, _cells(summary, "cpu_s_per_gb"), "relay CPU s per GB (less is better)",
              "CPU cost of bulk transfer")
        save(fig, "throughput.png")

    rr1 = [w.name for w in by_kind.get("rr_latency", [])]
    if rr1:
        fig, ax = plt.subplots(figsize=(10, 4.8))
        groups = {f"{w} {q}": (w, key) for w in rr1 for q, key in (("p50", "p50_us"), ("p99", "p99_us"))}
        _bars(ax, list(groups), names, lambda g, n: _cells(summary, groups[g][1])(groups[g][0], n),
              "µs per round trip (less is better)", "64-byte ping-pong latency, 1 connection")
        save(fig, "latency.png")

    rates = [(w.name, "rps", "req/s") for w in by_kind.get("rr_rate", [])]
    rates += [(w.name, "cps", "connections/s") for w in by_kind.get("conn_rate", [])]
    if rates:
        fig, axes = plt.subplots(1, len(rates), figsize=(6 * len(rates), 4.5), squeeze=False)
        for ax, (wname, key, unit) in zip(axes[0], rates, strict=True):
            _bars(ax, [wname], names, _cells(summary, key), f"{unit} (more is better)", wname)
        save(fig, "rates.png")

    idle = [w.name for w in by_kind.get("idle", [])]
    conn = [w.name for w in by_kind.get("conn_rate", [])]
    if idle or conn:
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        if idle:
            _bars(axes[0], ["Pss", "Rss"], relays,
                  lambda g, n: _cells(summary, "kib_per_conn" if g == "Pss" else "rss_kib_per_conn")(idle[0], n),
                  "KiB per idle connection (less is better)", f"Memory, {idle[0]}")
            axes[0].set_yscale("log")
        if conn:
            _bars(axes[1], conn, relays, _cells(summary, "cpu_s_per_1000"),
                  "relay CPU s per 1,000 connections (less is better)", "CPU cost of a connection")
        save(fig, "resources.png")

    if rules:
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        for variant, style in zip(VARIANTS, ("-", "--", ":"), strict=True):
            steps = sorted((s for s in rules if s["variant"] == variant), key=lambda s: s["rules"])
            if not steps:
                continue
            xs = [s["rules"] for s in steps]
            axes[0].plot(xs, [s["install_s"] * 1000 for s in steps], style, marker="o", label=variant)
            for which, marker in (("first", "o"), ("last", "s")):
                axes[1].plot(xs, [s[which]["connect_p50_us"] for s in steps], style, marker=marker,
                             label=f"{variant}, {which} rule")
        axes[0].set(xscale="log", yscale="log", xlabel="services (rules or set elements)",
                    ylabel="install time, ms", title="Installing the explicit method's rules")
        axes[1].set(xscale="log", xlabel="services (rules or set elements)", ylabel="connect() p50, µs",
                    title="Connection set-up vs number of rules")
        for ax in axes:
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        save(fig, "rules.png", legend=False)

    if calls:
        save(_syscalls(calls, [n for n in names if n in calls]), "syscalls.png", legend=False)

    if profile and profile.get("self"):
        top = profile["self"][:15][::-1]
        fig, ax = plt.subplots(figsize=(12, 5.5))
        ax.barh([e["function"][:80] for e in top], [e["percent"] for e in top], color="#1f77b4")
        ax.set_xlabel("% of samples holding the GIL (own time; Runner.run: the event loop's C code)")
        ax.set_title("proxy (uvloop) under the connection-rate workload: where the time goes")
        ax.tick_params(axis="y", labelsize=8)
        ax.grid(axis="x", alpha=0.3)
        save(fig, "profile.png", legend=False)
    return paths


def _syscalls(calls: dict, names: list[str], top: int = 15):
    """Per connection, one bar per subject: system calls stacked by name (the most
    frequent `top`, then the rest), and CPU stacked as user and system."""
    fig, axes = plt.subplots(1, 2, figsize=(13, 0.9 + 0.55 * len(names) + 2.2), width_ratios=(3, 2))
    labels = ["direct (app server)" if n == "direct" else n for n in names][::-1]
    order = names[::-1]
    shown = syscalls.shown_calls(calls)[:top]
    colours = plt.get_cmap("tab20").colors
    left = [0.0] * len(order)
    for i, call in enumerate([*shown, "other"]):
        widths = [(syscalls.other_calls(calls[n], shown) if call == "other"
                   else calls[n]["syscalls"].get(call, 0.0)) for n in order]
        axes[0].barh(labels, widths, left=left, label=call, color="#bbbbbb" if call == "other" else colours[i % 20])
        left = [a + b for a, b in zip(left, widths, strict=True)]
    axes[0].set_xlabel("system calls per connection (less is better)")
    axes[0].set_title("System calls per connection, by name")
    axes[0].legend(fontsize=8, ncol=6, loc="upper center", bbox_to_anchor=(0.5, -0.16), frameon=False)
    user = [calls[n]["user_us"] for n in order]
    system = [calls[n]["system_us"] for n in order]
    axes[1].barh(labels, user, label="user", color="#1f77b4")
    axes[1].barh(labels, system, left=user, label="system", color="#ff7f0e")
    axes[1].set_xlabel("CPU µs per connection (less is better)")
    axes[1].set_title("CPU per connection")
    axes[1].legend(fontsize=8, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.16), frameon=False)
    for ax in axes:
        ax.grid(axis="x", alpha=0.3)
    return fig
