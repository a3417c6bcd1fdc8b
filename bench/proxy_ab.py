"""What a PROXY protocol v2 header costs per connection: one amb pair, two routes to the same
redis through HAProxy, `plain` (a frontend without accept-proxy) and `pp` (a route with
`proxy-protocol = "v2"` to a frontend with accept-proxy), measured in interleaved rounds.

    python3 bench/proxy_ab.py --amb target/release/amb --transport quic [--rounds 6]

Loads: new connections (PING, -k 0, -c 50: a PROXY header per request) and GET -c 50 on kept
connections (none after the first). Both routes share the pair, the HAProxy process and redis,
so only the header differs: amb writing it, HAProxy parsing it. Prints the table for
BENCHMARKS.md and writes bench/results/proxy/*.json with --json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import run  # noqa: E402

LOADS = {
    "newconn": (["-k", "0", "-t", "ping_mbulk", "-c", "50"], 10_000, "PING_MBULK"),
    "get": (["-t", "get", "-c", "50"], 100_000, "GET"),
}


def haproxy_conf(plain: int, pp: int, redis: int) -> str:
    return (
        "global\n  maxconn 4000\n"
        "defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n"
        f"frontend plain\n  bind {run.HOST}:{plain}\n  default_backend redis\n"
        f"frontend pp\n  bind {run.HOST}:{pp} accept-proxy\n  default_backend redis\n"
        f"backend redis\n  server r {run.HOST}:{redis}\n"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--amb", required=True)
    ap.add_argument("--transport", choices=["quic", "tls"], default="quic")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    tools, missing = run.find_tools(install=True)
    if {"redis-server", "redis-benchmark", "haproxy"} & set(missing):
        print("proxy_ab: redis-server, redis-benchmark and haproxy are required", file=sys.stderr)
        return 2
    run.raise_nofile()
    b = run.Bench(argparse.Namespace(amb=args.amb, amb_client_arg=[], amb_server_arg=[]), dict(run.FULL))
    b.tools = tools
    rows: list[dict] = []
    try:
        b.setup()
        plain, pp, srv, local_plain, local_pp = (run.free_port(udp_too=True) for _ in range(5))
        conf = b.path("haproxy.cfg")
        conf.write_text(haproxy_conf(plain, pp, b.redis_port))
        haproxy = run.spawn([tools["haproxy"], "-db", "-f", conf], b.path("haproxy.log"))
        run.wait_listen(pp, haproxy)
        c = b.certs
        amb_conf = b.path("amb.toml")
        amb_conf.write_text(
            f'[server]\nlisten = "{run.HOST}:{srv}"\ncerts-dir = "{c}"\n\n'
            f'[[server.route]]\nname = "plain"\nupstream = "{run.HOST}:{plain}"\n\n'
            f'[[server.route]]\nname = "pp"\nupstream = "{run.HOST}:{pp}"\nproxy-protocol = "v2"\n')
        server = run.spawn([b.amb, "server", "--config", amb_conf], b.path("server.log"))
        run.wait_log(server, "amb server listening")
        client = run.spawn([b.amb, "client", "--listen", f"{run.HOST}:{local_plain}=plain",
                            "--listen", f"{run.HOST}:{local_pp}=pp", "--peer", f"localhost:{srv}",
                            "--transport", args.transport, "--certs-dir", c], b.path("client.log"))
        run.wait_log(client, "tunnel connection up")
        for port in (local_plain, local_pp):
            run.wait_ping(port, [client, server, haproxy])
        sides = [client.pid, server.pid]
        for r in range(args.rounds):
            row: dict = {}
            for load, (rb_args, n, key) in LOADS.items():
                order = [("plain", local_plain), ("pp", local_pp)]
                for name, port in (order if r % 2 == 0 else order[::-1]):
                    before = run.cpu_seconds(sides)
                    out = run.redis_benchmark(b, port, [*rb_args, "-n", str(n)])
                    cpu = run.cpu_seconds(sides) - before
                    row[f"{load}/{name}"] = {"rps": out[key]["rps"], "cpu_us_per_req": cpu / n * 1e6}
            rows.append(row)
            run.log(f"round {r + 1}: " + ", ".join(f"{k} {v['rps']:,.0f}/s" for k, v in row.items()))
    finally:
        run.stop_all()
    print(f"\namb-{args.transport}, {args.rounds} rounds, medians (range)")
    print("| load | route | req/s | CPU µs per request (both ambassadors) |")
    print("|---|---|---:|---:|")
    for key in rows[0]:
        rps = [row[key]["rps"] for row in rows]
        cpu = [row[key]["cpu_us_per_req"] for row in rows]
        load, name = key.split("/")
        print(f"| {load} | {name} | {statistics.median(rps):,.0f} ({min(rps):,.0f}–{max(rps):,.0f}) "
              f"| {statistics.median(cpu):.1f} ({min(cpu):.1f}–{max(cpu):.1f}) |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"transport": args.transport, "amb": b.amb_binary, "rounds": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
