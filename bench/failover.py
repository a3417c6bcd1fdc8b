"""Fail-over time: from killing an upstream (or a peer) to the first fresh connection that
succeeds elsewhere, and how many fresh connections failed meanwhile.

    python3 bench/failover.py --amb target/release/amb [--rounds 5] [--transport tls]

Upstream: one route over two redis-servers (least-conn); a loop of fresh connections (each
`INCR hits` on a new TCP connection through the pair) runs while one redis is killed
(SIGKILL). Peer: two amb servers, each before its own redis, and a client with both as peers;
one server is killed (SIGKILL; `--peer-signal term` shuts it down instead). For each round: connections made, failed, the longest a connection took from the
kill on, and the time from the kill to the first success after it. Writes
bench/results/failover/*.json.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import run  # noqa: E402


def incr(port: int, timeout: float = 10.0) -> bool:
    try:
        with socket.create_connection((run.HOST, port), timeout=timeout) as s:
            s.sendall(b"*2\r\n$4\r\nINCR\r\n$4\r\nhits\r\n")
            return s.recv(64).startswith(b":")
    except OSError:
        return False


def redis(tools: dict, work: Path) -> tuple:
    port = run.free_port()
    p = run.spawn([tools["redis-server"], "--port", port, "--bind", run.HOST, "--save", "",
                   "--appendonly", "no"], work / f"redis-{port}.log")
    run.wait_ping(port, [p])
    return p, port


def amb_server(amb: str, certs: Path, work: Path, upstreams: str, transport: str):
    port = run.free_port(udp_too=True)
    p = run.spawn([amb, "server", "--listen", f"{run.HOST}:{port}", "--upstream", upstreams,
                   "--certs-dir", certs, "--transport", "both"], work / f"server-{port}.log")
    run.wait_log(p, "amb server listening")
    return p, port


def amb_client(amb: str, certs: Path, work: Path, peers: list[int], transport: str):
    local = run.free_port()
    argv = [amb, "client", "--listen", f"{run.HOST}:{local}", "--transport", transport,
            "--certs-dir", certs, "--tunnel-wait", "30s"]
    for port in peers:
        argv += ["--peer", f"localhost:{port}"]
    p = run.spawn(argv, work / f"client-{local}.log")
    per_peer = 2 if transport == "tls" else 1
    run.wait_log(p, "tunnel connection up", count=per_peer * len(peers))
    run.wait_listen(local, p)
    return p, local


def measure(listen: int, victim, sig: int) -> dict:
    """Fresh connections for 1 s, the kill, 3 s more (past QUIC's 2 s liveness deadline)."""
    results: list[tuple[float, float, bool]] = []
    stop = threading.Event()

    def load():
        while not stop.is_set():
            t0 = time.monotonic()
            ok = incr(listen)
            results.append((t0, time.monotonic(), ok))

    t = threading.Thread(target=load)
    t.start()
    time.sleep(1.0)  # the load runs on its own thread: this only paces the round
    killed = time.monotonic()
    os.kill(victim.pid, sig)
    time.sleep(3.0)
    stop.set()
    t.join()
    after = [r for r in results if r[1] >= killed]
    first_ok = min((end for start, end, ok in after if ok and start >= killed), default=None)
    return {
        "connections": len(results),
        "failed": sum(1 for r in results if not r[2]),
        "longest_after_kill_ms": max((end - max(start, killed) for start, end, _ in after), default=0) * 1000,
        "kill_to_first_success_ms": (first_ok - killed) * 1000 if first_ok else None,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--amb", default="target/release/amb")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--transport", choices=["tls", "quic"], default="tls")
    ap.add_argument("--peer-signal", choices=["kill", "term"], default="kill",
                    help="how the peer is taken away: a crash (SIGKILL) or a shutdown (SIGTERM)")
    args = ap.parse_args()
    amb = str(Path(args.amb).resolve())
    tools, _ = run.find_tools(install=True)
    work = Path(tempfile.mkdtemp(prefix="amb-failover-"))
    certs = work / "certs"
    run.spawn([amb, "certs", "init", "--dir", certs], work / "certs.log").wait()
    out = HERE / "results" / "failover"
    out.mkdir(parents=True, exist_ok=True)
    rows = {"upstream": [], "peer": []}
    try:
        for r in range(args.rounds):
            # An upstream killed.
            (ra, pa), (rb, pb) = redis(tools, work), redis(tools, work)
            server, sport = amb_server(amb, certs, work, f"{run.HOST}:{pa},{run.HOST}:{pb}", args.transport)
            client, listen = amb_client(amb, certs, work, [sport], args.transport)
            rows["upstream"].append(measure(listen, ra, signal.SIGKILL))
            for p in (client, server, rb):
                run.stop(p)
            # A peer killed.
            (ra, pa), (rb, pb) = redis(tools, work), redis(tools, work)
            (sa, porta), (sb, portb) = (amb_server(amb, certs, work, f"{run.HOST}:{pa}", args.transport),
                                        amb_server(amb, certs, work, f"{run.HOST}:{pb}", args.transport))
            client, listen = amb_client(amb, certs, work, [porta, portb], args.transport)
            sig = signal.SIGKILL if args.peer_signal == "kill" else signal.SIGTERM
            rows["peer"].append(measure(listen, sa, sig))
            for p in (client, sb, ra, rb):
                run.stop(p)
            run.log(f"round {r + 1}: upstream {rows['upstream'][-1]}, peer {rows['peer'][-1]}")
    finally:
        run.stop_all()
    name = args.transport if args.peer_signal == "kill" else f"{args.transport}-term"
    (out / f"{name}.json").write_text(json.dumps({
        "transport": args.transport, "peer_signal": args.peer_signal, **rows, "at": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=1))
    print(f"\nfail-over, amb-{args.transport}, peer {args.peer_signal}, {args.rounds} rounds (medians; ranges)")
    print("| killed | fresh connections | failed | kill → first success | longest connection after the kill |")
    print("|---|---:|---:|---:|---:|")
    for kind, rs in rows.items():
        def med(k: str) -> str:
            xs = [x[k] for x in rs if x[k] is not None]
            if not xs:
                return "none in the window"
            return f"{statistics.median(xs):.1f} ms ({min(xs):.1f}–{max(xs):.1f})"
        print(f"| {kind} | {statistics.median(x['connections'] for x in rs):.0f} | "
              f"{sum(x['failed'] for x in rs)} in all | {med('kill_to_first_success_ms')} | "
              f"{med('longest_after_kill_ms')} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
