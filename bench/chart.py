#!/usr/bin/env python3
"""Draws bench/run.py's side-by-side results as one picture: a bar chart per metric, one bar per
pair, amb's bars in colour and the others in grey, so a reader sees amb beside haproxy, stunnel,
socat and spiped at a glance.

    python3 bench/chart.py [results.json] [-o out.png]

Defaults: bench/results/latest.json -> bench/results/latest.png. Needs matplotlib
(Debian: python3-matplotlib); bench/run.py --chart FILE calls this after a run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent

# (column in the results table, title, better when higher)
METRICS = [
    ("get_c50_rps", "redis GET, 50 clients (req/s)", True),
    ("get_p32_rps", "redis GET, pipelined x32 (req/s)", True),
    ("new_conns_s", "new connections/s", True),
    ("iperf_fwd_gbit", "bulk throughput (Gb/s)", True),
    ("ping_p99_us", "PING round trip, p99 (µs)", False),
    ("cpu_s_per_gb", "CPU per GB carried (s)", False),
    ("kib_per_conn", "memory per idle connection (KiB)", False),
    ("first_reply_ms", "first reply, 20 ms RTT link (ms)", False),
]

AMB_COLOURS = {"amb-tls": "#1f77b4", "amb-quic": "#2ca02c"}
OTHER = "#9e9e9e"


def draw(doc: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = doc["table"]
    pairs = [p for p in rows if p != "direct"]
    fig, axes = plt.subplots(2, 4, figsize=(18, 8))
    for ax, (key, title, higher) in zip(axes.flat, METRICS):
        values = [rows[p].get(key) for p in pairs]
        shown = [(p, v) for p, v in zip(pairs, values) if isinstance(v, (int, float))]
        names = [p for p, _ in shown]
        bars = ax.bar(
            names,
            [v for _, v in shown],
            color=[AMB_COLOURS.get(p, OTHER) for p in names],
        )
        ax.bar_label(bars, labels=[f"{v:,}" for _, v in shown], fontsize=7, padding=2)
        ax.set_title(title + ("" if higher else "  (lower is better)"), fontsize=10)
        ax.tick_params(axis="x", labelrotation=35, labelsize=8)
        ax.tick_params(axis="y", labelsize=8)
        ax.spines[["top", "right"]].set_visible(False)
    machine = doc.get("machine", {})
    fig.suptitle(
        f"amb beside other tunnel pairs, loopback, {machine.get('nproc', '?')} CPUs "
        f"({doc.get('mode', '?')} run, {doc.get('date', '?')[:10]})",
        fontsize=12,
    )
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", nargs="?", default=str(BENCH / "results" / "latest.json"))
    ap.add_argument("-o", "--out", help="the picture (PNG or SVG, by its extension)")
    args = ap.parse_args()
    source = Path(args.results)
    out = Path(args.out) if args.out else source.with_suffix(".png")
    try:
        draw(json.loads(source.read_text()), out)
    except ImportError:
        print("bench/chart.py needs matplotlib (apt-get install python3-matplotlib)", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
