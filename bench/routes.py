"""Route lookup and authorization with a large config file, and a reload of it under load.

    python3 bench/routes.py --amb target/release/amb [--routes 10000] [--rounds 6]

1. A/B (bench/ab.py, interleaved rounds): a server whose --config holds one route against one
   whose file holds --routes routes, each with an allow-list of its own, plus a server-wide
   list; the benchmark's route (`default`, from --upstream) keeps the file's allow-list, so every
   stream is looked up and authorized among them. Loads: GET -c 50 and new connections
   (PING -k 0 -c 50), over TLS and QUIC.
2. Reload under load: PING -c 1 through a pair whose server holds the large file, measured
   alone and while the file is rewritten (one route's upstream moved) and the server sent
   SIGHUP every 200 ms; p99 of each, interleaved for --rounds rounds.

Writes bench/results/routes/*.json and prints the tables for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import run  # noqa: E402

CLIENT = "uri:spiffe://amb/client"  # the identity `amb certs init` gives the client


def config(path: Path, routes: int, moved: int = 0) -> None:
    """A [server] part with `routes` routes (the first is `default`), each with its own
    allow-list; `moved` shifts one route's upstream, so that a rewrite is a change."""
    out = ["[server]", f'allow = ["{CLIENT}", "uri:spiffe://amb/other"]', "",
           "[[server.route]]", 'name = "default"', 'upstream = "127.0.0.1:1"',
           f'allow = ["{CLIENT}"]']
    for i in range(1, routes):
        port = 1024 + (i + moved if i == 1 else i) % 60000
        out += ["", "[[server.route]]", f'name = "route-{i}"', f'upstream = "127.0.0.1:{port}"',
                f'allow = ["uri:spiffe://amb/app-{i}"]']
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(out) + "\n")
    tmp.rename(path)


def ab(amb: str, one: Path, many: Path, transport: str, load: str, rounds: int, out: Path) -> str:
    cmd = [sys.executable, str(HERE / "ab.py"), "--variant", f"one={amb}", "--variant", f"many={amb}",
           "--server-arg", f"one=--config={one}", "--server-arg", f"many={'--config=' + str(many)}",
           "--transport", transport, "--load", load, "--rounds", str(rounds), "--json", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise run.BenchError(f"ab.py {transport} {load}: {r.stderr[-500:]}")
    return r.stdout[r.stdout.index(f"\namb-{transport}"):].strip()


def ping_p99(b: run.Bench, port: int) -> float:
    rows = run.redis_benchmark(b, port, ["-t", "ping_mbulk", "-c", "1", "-n", "20000"])
    return rows["PING_MBULK"]["p99_ms"] * 1000


def reload_under_load(amb: str, many: Path, routes: int, rounds: int, pair: str) -> dict:
    tools, _ = run.find_tools(install=True)
    cfg = dict(run.FULL)
    args = argparse.Namespace(amb=amb, amb_client_arg=[],
                              amb_server_arg=[f"--config={many}", "--reload-check=0s"])
    b = run.Bench(args, cfg)
    b.tools = tools
    result = {"quiet_p99_us": [], "reloading_p99_us": [], "reloads": []}
    try:
        b.setup()
        inst = b.start(pair, b.redis_port)
        server = inst.sides[1]
        log = Path(server.logfile)
        for r in range(rounds):
            result["quiet_p99_us"].append(ping_p99(b, inst.local_port))
            stop = threading.Event()
            before = log.read_text().count("config file reloaded")

            def rewrite():
                moved = r * 1000
                while not stop.is_set():
                    moved += 1
                    config(many, routes, moved)
                    os.kill(server.pid, signal.SIGHUP)
                    stop.wait(0.2)

            t = threading.Thread(target=rewrite)
            t.start()
            try:
                result["reloading_p99_us"].append(ping_p99(b, inst.local_port))
            finally:
                stop.set()
                t.join()
            run.wait_log(server, "config file reloaded", count=before + 1)
            result["reloads"].append(log.read_text().count("config file reloaded") - before)
            run.log(f"round {r + 1}: p99 quiet {result['quiet_p99_us'][-1]:.0f} µs, "
                    f"reloading {result['reloading_p99_us'][-1]:.0f} µs ({result['reloads'][-1]} reloads)")
        inst.close()
    finally:
        run.stop_all()
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--amb", default="target/release/amb")
    ap.add_argument("--routes", type=int, default=10_000)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--skip-ab", action="store_true", help="only the reload under load")
    ap.add_argument("--reload-transports", default="tls",
                    help="the pairs the reload under load runs through: tls, quic or tls,quic")
    args = ap.parse_args()
    amb = str(Path(args.amb).resolve())
    out = HERE / "results" / "routes"
    out.mkdir(parents=True, exist_ok=True)
    files = Path(os.environ.get("TMPDIR", "/tmp")) / f"amb-routes-{os.getpid()}"
    files.mkdir(exist_ok=True)
    one, many = files / "one.toml", files / "many.toml"
    config(one, 1)
    config(many, args.routes)
    print(f"config files: 1 route, {args.routes} routes ({many.stat().st_size // 1024} KiB)")
    if not args.skip_ab:
        for transport in ("tls", "quic"):
            for load in ("get", "newconn"):
                print(ab(amb, one, many, transport, load, args.rounds, out / f"{transport}-{load}.json"))
                print()
    for transport in args.reload_transports.split(","):
        res = reload_under_load(amb, many, args.routes, args.rounds, f"amb-{transport}")
        name = "reload.json" if transport == "tls" else f"reload-{transport}.json"
        (out / name).write_text(json.dumps({"routes": args.routes, "transport": transport, **res,
                                            "at": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=1))
        q, l = res["quiet_p99_us"], res["reloading_p99_us"]
        print(f"\nPING -c 1 p99 through amb-{transport}, {args.routes} routes, {args.rounds} rounds")
        print("| phase | median p99 µs | range | reloads per run (median) |")
        print("|---|---:|---|---:|")
        print(f"| quiet | {statistics.median(q):.0f} | {min(q):.0f}–{max(q):.0f} | – |")
        print(f"| SIGHUP + rewrite every 200 ms | {statistics.median(l):.0f} | {min(l):.0f}–{max(l):.0f} "
              f"| {statistics.median(res['reloads']):.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
