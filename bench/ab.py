"""Interleaved A/B rounds of amb variants on standalone pairs, on loopback.

    python3 bench/ab.py --variant base=/tmp/amb-base --variant new=target/release/amb \\
        --transport tls --load p32 --rounds 6

    python3 bench/ab.py --variant c1=target/release/amb:--connections=1 \\
        --variant c4=target/release/amb:--connections=4 --transport tls --load get

A variant is NAME=BINARY, optionally followed by :CLIENT_ARG and ::SERVER_ARG parts (each
repeatable), so two builds, or one build with two settings, can be compared. Every variant's
pair is up at once on the same redis-server and iperf3 server; each round runs the load once
per variant, the order rotated every round, and reads the CPU seconds of both ambassadors
around each run. The whole-run figures for `bench/run.py` are noisier than a change is large,
which is why changes are judged here: the rounds show how far the variants' ranges overlap.

Loads: get (GET -c 50), p32 (GET -c 50 -P 32), ping1 (PING -c 1, p50 latency), newconn
(PING -k 0 -c 50), iperf and iperf-r (iperf3 each way, 3 s), idle-mem (resident memory of
both ambassadors per idle connection, 5,000 connections, on a fresh pair each round). --link
puts run.py's emulated 20 ms RTT link between the ambassadors.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import signal
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run  # noqa: E402  (run.py's pair set-up, load generators and process accounting)

LOADS = {
    "get": (["-t", "get", "-c", "50", "-n", "100000"], "GET", "rps"),
    "p32": (["-t", "get", "-c", "50", "-P", "32", "-n", "1000000"], "GET", "rps"),
    "ping1": (["-t", "ping", "-c", "1", "-n", "10000"], "PING_MBULK", "p50_us"),
    "newconn": (["-k", "0", "-t", "ping", "-c", "50", "-n", "10000"], "PING_MBULK", "rps"),
}


def parse_variant(spec: str) -> dict:
    name, _, rest = spec.partition("=")
    if not name or not rest:
        raise argparse.ArgumentTypeError(f"{spec!r}: write NAME=BINARY[:CLIENT_ARG...][::SERVER_ARG...]")
    binary, *args = rest.split(":")
    client, server, to_server = [], [], False
    for a in args:
        if a == "":
            to_server = True
            continue
        (server if to_server else client).append(a)
    if not Path(binary).exists():
        raise argparse.ArgumentTypeError(f"{binary} not found")
    return {"name": name, "binary": binary, "client": client, "server": server}


def use(b: run.Bench, binary: Path, v: dict) -> None:
    """Makes the next pair `b` starts run this variant."""
    b.amb = binary
    b.args.amb_client_arg, b.args.amb_server_arg = v["client"], v["server"]


def main() -> int:
    ap = argparse.ArgumentParser(description="Interleaved A/B rounds of amb variants.")
    ap.add_argument("--variant", action="append", type=parse_variant, required=True,
                    help="NAME=BINARY[:CLIENT_ARG...][::SERVER_ARG...] (repeat for each variant)")
    ap.add_argument("--transport", choices=["tls", "quic"], default="tls")
    ap.add_argument("--load", choices=[*LOADS, "iperf", "iperf-r", "idle-mem"], default="get")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--link", action="store_true", help="put the emulated 20 ms RTT link between the ambassadors")
    ap.add_argument("--json", metavar="FILE", help="write the rounds as JSON")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    tools, missing = run.find_tools(install=True)
    if {"redis-server", "redis-benchmark", "iperf3"} & set(missing):
        print("ab: redis-server, redis-benchmark and iperf3 are required", file=sys.stderr)
        return 2
    run.raise_nofile()
    cfg = dict(run.FULL, iperf_secs=3, concurrent_conns=run.FULL["idle_conns"])
    pair = f"amb-{args.transport}"
    bench_args = argparse.Namespace(amb=args.variant[0]["binary"], amb_client_arg=[], amb_server_arg=[])
    b = run.Bench(bench_args, cfg)
    b.tools = tools
    instances = {}
    variants = {}
    rounds: list[dict] = []
    try:
        b.setup()
        for v in args.variant:
            copy = b.path(f"amb-{v['name']}")  # a private copy: a rebuild cannot change a variant mid-run
            shutil.copy2(v["binary"], copy)
            variants[v["name"]] = (copy, v)
            if args.load != "idle-mem":
                use(b, copy, v)
                upstream = b.iperf_port if args.load.startswith("iperf") else b.redis_port
                instances[v["name"]] = b.start(pair, upstream, link=args.link,
                                               smoke=not args.load.startswith("iperf"))
        names = list(variants)
        for r in range(args.rounds):
            row = {}
            for name in run._rotated(names, r):
                if args.load == "idle-mem":
                    use(b, *variants[name])
                    with b.start(pair, b.redis_port) as fresh:
                        out = asyncio.run(run.hold_connections(b, fresh))
                    row[name] = {"value": out["kib_per_conn"], "cpu_s": 0, "cpu_per_unit": 0}
                    continue
                inst = instances[name]
                roots = [p.pid for p in inst.sides]
                cpu0 = run.cpu_seconds(roots)
                if args.load.startswith("iperf"):
                    res = run.iperf(b, inst.local_port, reverse=args.load == "iperf-r")
                    value, units = res["gbit_s"], res["bytes"] / 1e9
                else:
                    load_args, row_name, key = LOADS[args.load]
                    res = run.redis_benchmark(b, inst.local_port, load_args)[row_name]
                    value = res["p50_ms"] * 1000 if key == "p50_us" else res["rps"]
                    units = int(load_args[load_args.index("-n") + 1]) / 1e6
                cpu = run.cpu_seconds(roots) - cpu0
                row[name] = {"value": round(value, 2), "cpu_s": round(cpu, 2),
                             "cpu_per_unit": round(cpu / units, 3)}
            rounds.append(row)
            run.log(f"round {r + 1}: " + ", ".join(f"{n} {row[n]['value']:g} ({row[n]['cpu_s']:g} s CPU)" for n in names))
    finally:
        for inst in instances.values():
            inst.close()
        run.stop_all()
        shutil.rmtree(b.work, ignore_errors=True)

    unit = {"iperf": "Gb/s", "iperf-r": "Gb/s", "ping1": "µs p50", "idle-mem": "KiB/conn"}.get(args.load, "req/s")
    per = "GB" if args.load.startswith("iperf") else "M requests"
    print(f"\n{pair}, load {args.load}{' over the 20 ms link' if args.link else ''}, {args.rounds} rounds")
    print(f"| variant | median {unit} | range | CPU s per {per} (median) |" if args.load != "idle-mem" else f"| variant | median {unit} | range | – |")
    print("|---|---:|---|---:|")
    for name in names:
        vals = [row[name]["value"] for row in rounds]
        cpus = [row[name]["cpu_per_unit"] for row in rounds]
        print(f"| {name} | {statistics.median(vals):,.2f} | {min(vals):,.2f}–{max(vals):,.2f} | "
              f"{statistics.median(cpus):.3f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"pair": pair, "load": args.load, "link": args.link,
                                               "variants": args.variant, "rounds": rounds,
                                               "at": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
