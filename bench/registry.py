"""A client following a large etcd registry under churn.

    python3 bench/registry.py --amb target/release/amb [--servers 1000] [--rate 100] [--secs 60]

One `amb server` (TLS, on 0.0.0.0) before redis; --servers registrations in a real etcd, each a
distinct loopback address of that server (127.0.a.b:PORT, so each is its own peer with its own
tunnel connection; the client pins --server-name localhost); one `amb client --peer
etcd://.../amb/fleet` following them. Then --rate registration changes a second for --secs
seconds (one put of a new address and one delete of an old, alternately: the set stays at
--servers), through etcd's JSON gateway. Measured:

- follow latency: from each change's request to etcd to the client acting on it (its log line
  for the new peer's link, or for letting the old one go; the same clock), median, p99, max;
- the data path: PING -c 1 through the client (p50, p99) quiet, during a churn of a prefix the
  client does not follow (what etcd and this script cost a 2-core machine), and during the
  churn it follows;
- the client's CPU seconds during each churn and its resident memory before and after.

Writes bench/results/registry/registry.json and prints a table for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import json
import re
import statistics
import sys
import threading
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import run  # noqa: E402


def address(i: int, port: int) -> str:
    """The i-th distinct loopback address of the server."""
    return f"127.0.{i // 250}.{i % 250 + 1}:{port}"


class Etcd:
    """A single-node etcd and its JSON gateway."""

    def __init__(self, b: run.Bench):
        self.port, peer_port = run.free_port(), run.free_port()
        url, peer = f"http://{run.HOST}:{self.port}", f"http://{run.HOST}:{peer_port}"
        self.proc = run.spawn(["etcd", "--name=bench", f"--data-dir={b.path('etcd')}",
                               f"--listen-client-urls={url}", f"--advertise-client-urls={url}",
                               f"--listen-peer-urls={peer}", f"--initial-advertise-peer-urls={peer}",
                               f"--initial-cluster=bench={peer}", "--quota-backend-bytes=4294967296"],
                              b.path("etcd.log"))
        run.wait_listen(self.port, self.proc)
        run.wait_until(lambda: self._ok("/v3/kv/range", {"key": _b64("/")}), "etcd answers", 15,
                       [self.proc])

    def _call(self, path: str, body: dict) -> dict:
        req = urllib.request.Request(f"http://{run.HOST}:{self.port}{path}", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=5) as r:
            return json.loads(r.read())

    def _ok(self, path: str, body: dict) -> bool:
        try:
            self._call(path, body)
            return True
        except OSError:
            return False

    def put(self, key: str, value: str) -> None:
        self._call("/v3/kv/put", {"key": _b64(key), "value": _b64(value)})

    def delete(self, key: str) -> None:
        self._call("/v3/kv/deleterange", {"key": _b64(key)})


def _b64(s: str) -> str:
    return base64.b64encode(s.encode()).decode()


STAMP = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+)Z")


def acted(logfile: Path) -> dict[tuple[str, str], float]:
    """When the client acted on each peer: ("came", addr) at its link's start, ("went", addr)
    when it let the link go; epoch seconds."""
    out = {}
    for line in logfile.read_text(errors="replace").splitlines():
        m = STAMP.match(line)
        if not m:
            continue
        if "discovered peer: connecting" in line:
            kind = "came"
        elif "peer no longer used" in line:
            kind = "went"
        else:
            continue
        peer = re.search(r"peer=(\S+)", line)
        if peer:
            at = datetime.datetime.fromisoformat(m.group(1)).replace(tzinfo=datetime.timezone.utc)
            out.setdefault((kind, peer.group(1).strip('"')), at.timestamp())
    return out


def ping(b: run.Bench, port: int, n: int) -> dict:
    row = run.redis_benchmark(b, port, ["-t", "ping_mbulk", "-c", "1", "-n", str(n)])["PING_MBULK"]
    return {"p50_us": row["p50_ms"] * 1000, "p99_us": row["p99_ms"] * 1000, "rps": row["rps"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--amb", default="target/release/amb")
    ap.add_argument("--servers", type=int, default=1000)
    ap.add_argument("--rate", type=float, default=100, help="registration changes a second")
    ap.add_argument("--secs", type=float, default=60)
    ap.add_argument("--json", default=str(HERE / "results" / "registry" / "registry.json"))
    args = ap.parse_args()

    tools, missing = run.find_tools(install=True)
    if {"redis-server", "redis-benchmark"} & set(missing):
        print("registry: redis-server and redis-benchmark are required", file=sys.stderr)
        return 2
    run.raise_nofile()
    cfg = dict(run.FULL)
    b = run.Bench(argparse.Namespace(amb=args.amb, amb_client_arg=[], amb_server_arg=[]), cfg)
    b.tools = tools
    result: dict = {"servers": args.servers, "rate": args.rate, "secs": args.secs,
                    "amb": b.amb_binary, "at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    try:
        b.setup()
        etcd = Etcd(b)
        srv_port = run.free_port()
        server = run.spawn([b.amb, "server", "--listen", f"0.0.0.0:{srv_port}", "--transport", "tls",
                            "--upstream", f"{run.HOST}:{b.redis_port}", "--certs-dir", b.certs,
                            "--max-connections", "100000"], b.path("server.log"))
        run.wait_log(server, "amb server listening")
        for i in range(args.servers):
            etcd.put(f"/amb/fleet/s{i}", address(i, srv_port))
        local = run.free_port()
        client_log = b.path("client.log")
        client = run.spawn([b.amb, "client", "--listen", f"{run.HOST}:{local}", "--transport", "tls",
                            "--connections", "1", "--server-name", "localhost", "--peer",
                            f"etcd://{run.HOST}:{etcd.port}/amb/fleet", "--certs-dir", b.certs],
                           client_log)
        started = time.monotonic()
        run.wait_log(client, "tunnel connection up", count=args.servers, timeout=120)
        result["all_up_s"] = round(time.monotonic() - started, 2)
        run.log(f"{args.servers} tunnel connections up in {result['all_up_s']} s")
        run.wait_ping(local, [client])
        result["rss_kib_before"] = run.memory([client.pid])["rss_kib"]
        result["quiet"] = ping(b, local, 20_000)
        run.log(f"quiet: {result['quiet']}")

        # The churn, in its own thread, while PING -c 1 runs through the client: first under
        # a prefix the client does not follow (what etcd and this script cost the machine),
        # then under its own.
        def churn(prefix: str, changes: list, first_new: int):
            interval, nxt, oldest = 1.0 / args.rate, first_new, 0
            deadline = time.monotonic() + args.secs
            tick = time.monotonic()
            while tick < deadline:
                sent = time.time()
                if len(changes) % 2 == 0:
                    etcd.put(f"{prefix}/s{nxt}", address(nxt, srv_port))
                    changes.append(("came", address(nxt, srv_port), sent))
                    nxt += 1
                else:
                    etcd.delete(f"{prefix}/s{oldest}")
                    changes.append(("went", address(oldest, srv_port), sent))
                    oldest += 1
                tick += interval
                time.sleep(max(0.0, tick - time.monotonic()))

        def churning(prefix: str, first_new: int) -> tuple[list, dict]:
            changes: list[tuple[str, str, float]] = []  # (kind, address, sent at)
            cpu0, t0 = run.cpu_seconds([client.pid]), time.monotonic()
            churner = threading.Thread(target=churn, args=(prefix, changes, first_new))
            churner.start()
            busy = []
            while churner.is_alive():
                busy.append(ping(b, local, 5_000))
            churner.join()
            secs = time.monotonic() - t0
            return changes, {"p50_us": statistics.median(x["p50_us"] for x in busy),
                             "p99_us": max(x["p99_us"] for x in busy), "runs": len(busy),
                             "cpu_s_per_s": round((run.cpu_seconds([client.pid]) - cpu0) / secs, 3),
                             "rate": round(len(changes) / secs, 1)}

        _, result["elsewhere"] = churning("/amb/other", 0)
        run.log(f"churn elsewhere: {result['elsewhere']}")
        changes, result["churn"] = churning("/amb/fleet", args.servers)
        run.log(f"churn followed: {result['churn']}")
        time.sleep(2)  # the last changes' log lines
        result["rss_kib_after"] = run.memory([client.pid])["rss_kib"]
        seen = acted(client_log)
        lags = [seen[(kind, addr)] - at for kind, addr, at in changes if (kind, addr) in seen]
        lags_ms = sorted(x * 1000 for x in lags)
        result["changes"] = len(changes)
        result["followed"] = len(lags_ms)
        result["follow_ms"] = {
            "p50": round(statistics.median(lags_ms), 2),
            "p99": round(lags_ms[int(len(lags_ms) * 0.99) - 1], 2),
            "max": round(lags_ms[-1], 2),
        } if lags_ms else None
    finally:
        run.stop_all()

    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1))
    f = result.get("follow_ms") or {}
    print(f"\n{args.servers} registered servers, {result['churn']['rate']} changes/s for {args.secs:g} s "
          f"({result.get('followed')}/{result.get('changes')} followed)")
    print("| figure | value |")
    print("|---|---:|")
    print(f"| follow latency p50 / p99 / max | {f.get('p50')} / {f.get('p99')} / {f.get('max')} ms |")
    q, e, c = result["quiet"], result["elsewhere"], result["churn"]
    print(f"| PING -c 1 p50: quiet / churn elsewhere / churn followed | {q['p50_us']:.0f} / {e['p50_us']:.0f} / {c['p50_us']:.0f} µs |")
    print(f"| PING -c 1 p99 (worst run): quiet / elsewhere / followed | {q['p99_us']:.0f} / {e['p99_us']:.0f} / {c['p99_us']:.0f} µs |")
    print(f"| client CPU: churn elsewhere / followed | {e['cpu_s_per_s']} / {c['cpu_s_per_s']} s/s |")
    print(f"| client RSS before → after | {result['rss_kib_before'] / 1024:.1f} → {result['rss_kib_after'] / 1024:.1f} MiB |")
    print(f"| {args.servers} tunnel connections up after start | {result['all_up_s']} s |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
