#!/usr/bin/env python3
"""Idle memory per connection of each side of one amb pair, apart: a fresh server and client
on loopback in front of a redis-server, 200 warm-up connections, then 5,000 more held open
(each answered one PING); the growth of each process's resident memory over those 5,000.

    python3 bench/idle_split.py BINARY [quic|tls] [extra server args...]

bench/ab.py --load idle-mem measures both sides together, in A/B rounds; this tells which side
a change moved. Needs redis-server; makes its own certificates with `BINARY certs init`.
"""

import os
import socket
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run  # noqa: E402  (free ports, readiness, process tree accounting)


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS"))


def hold(port: int, n: int) -> list:
    conns = []
    for _ in range(n):
        conn = socket.create_connection((run.HOST, port))
        conn.sendall(b"PING\r\n")
        conns.append(conn)
    for conn in conns:
        conn.recv(16)
    return conns


def main() -> int:
    binary, transport, extra = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else "tls"), sys.argv[3:]
    run.raise_nofile()
    work = tempfile.mkdtemp(prefix="amb-idle-")
    subprocess.run([binary, "certs", "init", "--dir", f"{work}/certs"], check=True, capture_output=True)
    redis_port, tunnel, listen = run.free_port(), run.free_port(udp_too=True), run.free_port()
    procs = [run.spawn(["redis-server", "--port", str(redis_port), "--save", ""], f"{work}/redis.log")]
    try:
        run.wait_listen(redis_port)
        server = run.spawn([binary, "server", "--listen", f"{run.HOST}:{tunnel}", "--upstream",
                            f"{run.HOST}:{redis_port}", "--certs-dir", f"{work}/certs", "--transport",
                            transport, *extra], f"{work}/server.log")
        procs.append(server)
        run.wait_listen(tunnel, server, udp=transport == "quic")
        client = run.spawn([binary, "client", "--listen", str(listen), "--peer", f"localhost:{tunnel}",
                            "--certs-dir", f"{work}/certs", "--transport", transport], f"{work}/client.log")
        procs.append(client)
        run.wait_ping(listen, (server, client))
        warm = hold(listen, 200)
        before = rss_kib(server.pid), rss_kib(client.pid)
        held = hold(listen, 5000)
        time.sleep(1)  # let both settle; memory is read, not waited on
        after = rss_kib(server.pid), rss_kib(client.pid)
        print(f"{binary} {transport}: server {(after[0] - before[0]) / 5000:.2f} KiB/conn, "
              f"client {(after[1] - before[1]) / 5000:.2f} KiB/conn")
        for conn in warm + held:
            conn.close()
    finally:
        for p in procs:
            run.stop(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
