"""Interleaved A/B rounds of amb variants on standalone pairs, on loopback.

    python3 bench/ab.py --variant base=/tmp/amb-base --variant new=target/release/amb \\
        --transport tls --load p32 --rounds 6

    python3 bench/ab.py --variant c1=target/release/amb --client-arg c1=--connections=1 \\
        --variant c4=target/release/amb --client-arg c4=--connections=4 --load get

A variant is NAME=BINARY, with extra client and server arguments given per variant
(--client-arg NAME=ARG, --server-arg NAME=ARG, --unix-upstream NAME, --two-upstreams NAME,
--discovered-peer NAME=srv|etcd), so
two builds, or one build with two settings, can be compared. The variants measured in BENCHMARKS.md are patches in `bench/variants/`. Every variant's
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
import hashlib
import json
import shutil
import signal
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run  # noqa: E402  (run.py's pair set-up, load generators and process accounting)

# load: (redis-benchmark arguments, requests, requests across the link, row, figure)
LOADS = {
    "get": (["-t", "get", "-c", "50"], 100_000, 20_000, "GET", "rps"),
    "p32": (["-t", "get", "-c", "50", "-P", "32"], 1_000_000, 200_000, "GET", "rps"),
    "ping1": (["-t", "ping_mbulk", "-c", "1"], 10_000, 300, "PING_MBULK", "p50_us"),
    "newconn": (["-k", "0", "-t", "ping_mbulk", "-c", "50"], 10_000, 1_000, "PING_MBULK", "rps"),
}


def parse_variant(spec: str) -> dict:
    name, _, binary = spec.partition("=")
    if not name or not binary:
        raise argparse.ArgumentTypeError(f"{spec!r}: write NAME=BINARY")
    if not Path(binary).exists():
        raise argparse.ArgumentTypeError(f"{binary} not found")
    return {"name": name, "binary": binary, "client": [], "server": [], "unix_upstream": False,
            "two_upstreams": False, "discovered_peer": None}


def named_arg(spec: str) -> tuple[str, str]:
    name, _, arg = spec.partition("=")
    if not name or not arg:
        raise argparse.ArgumentTypeError(f"{spec!r}: write NAME=ARG, e.g. c1=--connections=1")
    return name, arg


def measure(b: run.Bench, args, pair: str, variant: tuple, inst) -> dict:
    """One run of the load on one variant's pair (a fresh one for idle-mem)."""
    if args.load == "idle-mem":
        use(b, *variant)
        with b.start(pair, b.redis_port, link=args.link) as fresh:
            out = asyncio.run(run.hold_connections(b, fresh))
        if "kib_per_conn" not in out:
            raise run.BenchError(f"no idle connection opened: {out.get('open_errors')}")
        return {"value": out["kib_per_conn"], "cpu_s": None, "cpu_per_unit": None}
    roots = [p.pid for p in inst.sides]
    cpu0 = run.cpu_seconds(roots)
    if args.load.startswith("iperf"):
        res = run.iperf(b, inst.local_port, reverse=args.load == "iperf-r")
        value, units = res["gbit_s"], res["bytes"] / 1e9
    else:
        load_args, n, n_link, row_name, figure = LOADS[args.load]
        n = n_link if args.link else n
        res = run.redis_benchmark(b, inst.local_port, [*load_args, "-n", str(n)])[row_name]
        value = res["p50_ms"] * 1000 if figure == "p50_us" else res["rps"]
        units = n / 1e6
    cpu = run.cpu_seconds(roots) - cpu0
    return {"value": round(value, 2), "cpu_s": round(cpu, 2), "cpu_per_unit": round(cpu / units, 3)}


def describe(m: dict) -> str:
    if "error" in m:
        return f"failed: {m['error']}"
    return f"{m['value']:g}" + (f" ({m['cpu_s']:g} s CPU)" if m["cpu_s"] is not None else "")


def use(b: run.Bench, binary: Path, v: dict) -> None:
    """Makes the next pair `b` starts run this variant."""
    b.amb = binary
    b.args.amb_client_arg, b.args.amb_server_arg = v["client"], v["server"]
    b.amb_unix_upstream = v["unix_upstream"]
    b.amb_two_upstreams = v["two_upstreams"]
    b.amb_peer_discovery = v["discovered_peer"]


class Scraper:
    """GETs each URL once a second in a thread until stopped, as a Prometheus server would."""

    def __init__(self, urls: list[str]):
        import threading

        self.urls, self.done, self.scrapes, self.failures = urls, threading.Event(), 0, 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        if urls:
            self.thread.start()

    def _run(self):
        import urllib.request

        while not self.done.wait(1.0):
            for url in self.urls:
                try:
                    with urllib.request.urlopen(url, timeout=5) as answer:
                        answer.read()
                    self.scrapes += 1
                except OSError:
                    self.failures += 1

    def stop(self):
        if self.urls:
            self.done.set()
            self.thread.join()
            run.log(f"scraped {self.scrapes} times ({self.failures} failed)")


def main() -> int:
    ap = argparse.ArgumentParser(description="Interleaved A/B rounds of amb variants.")
    ap.add_argument("--variant", action="append", type=parse_variant, required=True,
                    help="NAME=BINARY (repeat for each variant)")
    ap.add_argument("--client-arg", action="append", type=named_arg, default=[],
                    help="NAME=ARG: an extra amb client argument for variant NAME (repeatable)")
    ap.add_argument("--server-arg", action="append", type=named_arg, default=[],
                    help="NAME=ARG: an extra amb server argument for variant NAME (repeatable)")
    ap.add_argument("--unix-upstream", action="append", default=[], metavar="NAME",
                    help="variant NAME's server dials redis over its Unix socket (repeatable)")
    ap.add_argument("--two-upstreams", action="append", default=[], metavar="NAME",
                    help="variant NAME's route has two upstreams, redis at 127.0.0.1 and 127.0.0.2 (repeatable)")
    ap.add_argument("--discovered-peer", action="append", type=named_arg, default=[],
                    metavar="NAME=srv|etcd", help="variant NAME's client finds its server by an SRV record "
                    "(a dnsmasq) or an etcd key, not as HOST:PORT (repeatable)")
    ap.add_argument("--transport", choices=["tls", "quic"], default="tls")
    ap.add_argument("--load", choices=[*LOADS, "iperf", "iperf-r", "idle-mem"], default="get")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--link", action="store_true", help="put the emulated 20 ms RTT link between the ambassadors")
    ap.add_argument("--json", metavar="FILE", help="write the rounds as JSON")
    ap.add_argument("--scrape", action="append", default=[], metavar="URL",
                    help="GET this URL (a variant's /metrics, given by --server-arg/--client-arg NAME=--metrics=...) "
                    "once a second for the whole run, as Prometheus would (repeatable)")
    args = ap.parse_args()
    by_name = {v["name"]: v for v in args.variant}
    if len(by_name) != len(args.variant):
        ap.error("variant names must differ")
    for side, extra in (("client", args.client_arg), ("server", args.server_arg)):
        for name, arg in extra:
            if name not in by_name:
                ap.error(f"--{side}-arg {name}={arg}: no variant named {name}")
            by_name[name][side].append(arg)
    for name in args.two_upstreams:
        if name not in by_name:
            ap.error(f"--two-upstreams {name}: no variant named {name}")
        by_name[name]["two_upstreams"] = True
    for name, kind in args.discovered_peer:
        if name not in by_name or kind not in ("srv", "etcd"):
            ap.error(f"--discovered-peer {name}={kind}: write NAME=srv or NAME=etcd for a variant NAME")
        by_name[name]["discovered_peer"] = kind
    for name in args.unix_upstream:
        if name not in by_name:
            ap.error(f"--unix-upstream {name}: no variant named {name}")
        by_name[name]["unix_upstream"] = True
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")
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
        scraper = Scraper(args.scrape)
        for r in range(args.rounds):
            row = {}
            for name in run._rotated(names, r):
                try:
                    row[name] = measure(b, args, pair, variants[name], instances.get(name))
                except run.BenchError as e:
                    row[name] = {"error": str(e)}
            rounds.append(row)
            run.log(f"round {r + 1}: " + ", ".join(f"{n} {describe(row[n])}" for n in names))
        scraper.stop()
    finally:
        for inst in instances.values():
            inst.close()
        run.stop_all()
        shutil.rmtree(b.work, ignore_errors=True)

    unit = {"iperf": "Gb/s", "iperf-r": "Gb/s", "ping1": "µs p50", "idle-mem": "KiB/conn"}.get(args.load, "req/s")
    per = "GB" if args.load.startswith("iperf") else "M requests"
    print(f"\n{pair}, load {args.load}{' over the 20 ms link' if args.link else ''}, {args.rounds} rounds")
    print(f"| variant | median {unit} | range | CPU s per {per} (median) | failed runs |")
    print("|---|---:|---|---:|---:|")
    for name in names:
        good = [row[name] for row in rounds if "value" in row[name]]
        failed = len(rounds) - len(good)
        if not good:
            print(f"| {name} | – | – | – | {failed} |")
            continue
        vals = [g["value"] for g in good]
        cpus = [g["cpu_per_unit"] for g in good if g["cpu_per_unit"] is not None]
        cpu = f"{statistics.median(cpus):.3f}" if cpus else "–"
        print(f"| {name} | {statistics.median(vals):,.2f} | {min(vals):,.2f}–{max(vals):,.2f} | {cpu} | {failed} |")
    if args.json:
        for v in args.variant:
            v["sha256"] = hashlib.sha256(Path(v["binary"]).read_bytes()).hexdigest()[:16]
        Path(args.json).write_text(json.dumps({"pair": pair, "load": args.load, "link": args.link,
                                               "variants": args.variant, "rounds": rounds,
                                               "at": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
