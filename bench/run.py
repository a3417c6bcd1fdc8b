#!/usr/bin/env python3
"""Side-by-side benchmark of amb against other tunnel pairs, on loopback.

    python3 bench/run.py [--quick] [--json out.json] [--chart out.png] [--pairs a,b,...] [--keep]

Pairs: direct (no tunnel), socat (plaintext two-hop relay, a floor), stunnel (mTLS),
haproxy (mTLS, TLS 1.3 both ends), spiped, amb-tls, amb-quic, and the reverse layouts
amb-rev-tls and amb-rev-quic (the service side dials the app side); rathole-noise and
rathole-tls only when named in --pairs (`cargo install rathole`). All TLS pairs use the same
ECDSA P-256 certificates from `amb certs init` and verify the peer. Every pair carries the same
upstreams (one redis-server, one iperf3 server) and is driven by the same load generators.

Metrics 1-4 and 6 run with every pair up at once, in interleaved rounds (pair order rotated
each round; medians kept), so a noisy neighbour drifting over time hits all pairs alike.
Metrics 5, 7 and 8 run pair by pair on fresh instances.

Metrics (per pair):
  1. redis-benchmark -t get -c 50, and with -P 32: requests/s
  2. redis-benchmark -t ping -c 1: p50/p99 latency (PING_MBULK row), p50 added over direct
  3. redis-benchmark -k 0 -t ping -c 50: new connections/s (mean of the two ping rows)
  4. iperf3 through the pair, both directions
  5. memory per idle connection (both sides together, fresh instance) and N concurrent
     connections answering PING
  6. CPU seconds per GB carried (both sides together, around the iperf3 runs)
  7. time to first reply of a fresh connection across an emulated 20 ms RTT link
  8. same link, 1% loss: 8 parallel request streams, p99 latency (full mode only)

Every process started is killed in a `finally`; readiness is polled, never slept for.
--quick finishes in about 2 minutes and exits non-zero if any pair fails to answer.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import io
import json
import os
import platform
import random
import re
import resource
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
LINKEMU = BENCH / "linkemu.py"
HOST = "127.0.0.1"
PAIRS = ["direct", "socat", "stunnel", "haproxy", "spiped", "amb-tls", "amb-quic", "amb-rev-tls", "amb-rev-quic"]
# Run only when asked for (--pairs): rathole is not a Debian package (`cargo install rathole`).
EXTRA_PAIRS = ["rathole-noise", "rathole-tls"]
AMB_PAIRS = ("amb-tls", "amb-quic")
# Reverse tunnels: the service side dials the app side (amb server --peer, amb client --accept;
# rathole's client beside the service, its server beside the app).
REVERSE_PAIRS = ("amb-rev-tls", "amb-rev-quic", "rathole-noise", "rathole-tls")
LINK_DELAY_MS = 10.0  # each way; the emulated round trip is 20 ms
LINK_LOSS = 0.01

FULL = dict(
    rounds=5, get_n=50_000, p32_n=500_000, ping_n=5_000, newconn_n=2_000, iperf_rounds=3, iperf_secs=3,
    idle_conns=5_000, concurrent_conns=10_000, first_reply_n=20, loss_secs=10, loss_streams=8,
    rb_timeout=150,
)
QUICK = dict(
    rounds=1, get_n=5_000, p32_n=50_000, ping_n=2_000, newconn_n=500, iperf_rounds=1, iperf_secs=1,
    idle_conns=500, concurrent_conns=1_000, first_reply_n=5, loss_secs=0, loss_streams=8,
    rb_timeout=40,
)

# binary -> Debian package
TOOLS = {
    "redis-server": "redis-server", "redis-benchmark": "redis-tools", "iperf3": "iperf3",
    "socat": "socat", "stunnel": "stunnel4", "haproxy": "haproxy", "spiped": "spiped",
    "iptables": "iptables",  # drops TCP segments for metric 8; without it that loss is not emulated
    "rathole": None,  # not packaged: cargo install rathole
    "openssl": "openssl",  # rathole-tls's PKCS#12 identity
}
NEEDS = {
    "direct": [], "socat": ["socat"], "stunnel": ["stunnel"], "haproxy": ["haproxy"],
    "spiped": ["spiped"], "amb-tls": [], "amb-quic": [], "amb-rev-tls": [], "amb-rev-quic": [],
    "rathole-noise": ["rathole"], "rathole-tls": ["rathole", "openssl"],
}


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class BenchError(Exception):
    pass


# ---------------------------------------------------------------- processes

_ALL_PROCS: list[subprocess.Popen] = []


def spawn(argv, logfile: Path, **kw) -> subprocess.Popen:
    """Starts a process in its own process group (so its forked children die with it)."""
    out = open(logfile, "ab")
    try:
        p = subprocess.Popen(
            [str(a) for a in argv], stdout=kw.pop("stdout", out), stderr=out,
            stdin=kw.pop("stdin", subprocess.DEVNULL), start_new_session=True, **kw,
        )
    finally:
        out.close()
    p.logfile = logfile  # type: ignore[attr-defined]
    _ALL_PROCS.append(p)
    return p


def stop(p: subprocess.Popen, grace: float = 2.0) -> None:
    """SIGTERM the process group we started, then SIGKILL it if it lingers."""
    if p.poll() is None:
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            p.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    try:  # leftover children of the group (socat forks), or the leader itself
        os.killpg(p.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        p.wait(5)
    except subprocess.TimeoutExpired:
        pass
    if p.stdin:
        try:
            p.stdin.close()
        except OSError:
            pass
    if p in _ALL_PROCS:
        _ALL_PROCS.remove(p)


def stop_all() -> None:
    for p in reversed(list(_ALL_PROCS)):
        stop(p, grace=1.0)


def log_tail(p: subprocess.Popen, n: int = 5) -> str:
    try:
        lines = Path(p.logfile).read_text(errors="replace").strip().splitlines()  # type: ignore
        return " | ".join(lines[-n:])
    except OSError:
        return ""


# ---------------------------------------------------------------- ports and readiness

def free_port(udp_too: bool = False) -> int:
    """A port free on TCP (and UDP) by binding port 0; bounded retries."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind((HOST, 0))
            port = s.getsockname()[1]
        if not udp_too:
            return port
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                u.bind((HOST, port))
            return port
        except OSError:
            continue
    raise BenchError("no free port found")


def _proc_net_ports(kind: str) -> set[int]:
    ports = set()
    for name in (f"/proc/net/{kind}", f"/proc/net/{kind}6"):
        try:
            with open(name) as f:
                next(f)
                for line in f:
                    parts = line.split()
                    local, state = parts[1], parts[3]
                    if kind == "tcp" and state != "0A":  # LISTEN
                        continue
                    ports.add(int(local.rsplit(":", 1)[1], 16))
        except OSError:
            pass
    return ports


def wait_until(pred, what: str, timeout: float, procs=(), step: float = 0.02):
    """Polls pred() until true; fails early if one of procs exited. Bounded by timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        for p in procs:
            if p.poll() is not None:
                raise BenchError(f"{what}: process exited rc={p.returncode}: {log_tail(p)}")
        time.sleep(step)
    raise BenchError(f"{what}: not ready within {timeout:.0f}s " + " ".join(log_tail(p) for p in procs))


def wait_listen(port: int, proc=None, udp: bool = False, timeout: float = 15.0):
    kind = "udp" if udp else "tcp"
    wait_until(lambda: port in _proc_net_ports(kind), f"{kind} port {port}", timeout,
               [proc] if proc else [])


def wait_log(proc, pattern: str, count: int = 1, timeout: float = 15.0):
    def seen():
        try:
            return Path(proc.logfile).read_text(errors="replace").count(pattern) >= count
        except OSError:
            return False
    wait_until(seen, f"log '{pattern}' x{count}", timeout, [proc])


def ping_once(port: int, timeout: float = 5.0) -> float:
    """Fresh connection, PING, wait for +PONG; returns seconds."""
    t0 = time.perf_counter()
    with socket.create_connection((HOST, port), timeout=timeout) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(b"PING\r\n")
        buf = b""
        while b"\r\n" not in buf:
            chunk = s.recv(64)
            if not chunk:
                raise BenchError(f"connection closed before reply (got {buf!r})")
            buf += chunk
        dt = time.perf_counter() - t0
    if not buf.startswith(b"+PONG"):
        raise BenchError(f"unexpected reply {buf!r}")
    return dt


def wait_ping(port: int, procs=(), timeout: float = 15.0):
    last = [None]

    def ok():
        try:
            ping_once(port, timeout=3)
            return True
        except Exception as e:  # not up yet
            last[0] = e
            return False
    try:
        wait_until(ok, f"PING through port {port}", timeout, procs, step=0.1)
    except BenchError as e:
        raise BenchError(f"{e} (last error: {last[0]})") from None


# ---------------------------------------------------------------- /proc accounting

CLK = os.sysconf("SC_CLK_TCK")


def _stat(pid: int):
    with open(f"/proc/{pid}/stat") as f:
        s = f.read()
    return s[s.rindex(")") + 2:].split()


def tree_pids(roots: list[int]) -> list[int]:
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                children.setdefault(int(_stat(int(d))[1]), []).append(int(d))
            except (OSError, IndexError, ValueError):
                pass
    out, todo = [], list(roots)
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def _status_kib(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def _pss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def memory(roots: list[int]) -> dict:
    """VmRSS of the roots' process trees; PSS too when a tree has several processes."""
    pids = tree_pids(roots)
    rss = pss = 0
    for pid in pids:
        try:
            rss += _status_kib(pid, "VmRSS")
            if len(pids) > len(roots):
                pss += _pss_kib(pid)
        except OSError:
            pass
    multi = len(pids) > len(roots)
    return {"rss_kib": rss, "pss_kib": pss if multi else rss, "processes": len(pids),
            "kib": pss if multi else rss, "basis": "PSS (process tree)" if multi else "VmRSS"}


def cpu_seconds(roots: list[int]) -> float:
    """utime+stime of the live trees, plus what the roots reaped from exited children."""
    total = 0
    for pid in tree_pids(roots):
        try:
            f = _stat(pid)
            total += int(f[11]) + int(f[12])
            if pid in roots:
                total += int(f[13]) + int(f[14])
        except (OSError, IndexError):
            pass
    return total / CLK


# ---------------------------------------------------------------- pairs

class Instance:
    """One running pair: local port the app connects to, the ambassador processes."""

    def __init__(self, pair: str):
        self.pair = pair
        self.local_port = 0
        self.procs: list[subprocess.Popen] = []
        self.sides: list[subprocess.Popen] = []  # ambassador processes (client, server)
        self.relay: subprocess.Popen | None = None
        self.relay_tcp_port = 0

    def close(self):
        for p in reversed(self.procs):
            stop(p)
        self.procs.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Bench:
    def __init__(self, args, cfg):
        self.args = args
        self.cfg = cfg
        self.work = Path(tempfile.mkdtemp(prefix="amb-bench-"))
        self.certs = self.work / "certs"
        self.amb = Path(args.amb)
        self.redis_port = 0
        # redis also listens here; an amb server dials it instead of TCP while this is set
        # (`bench/ab.py --unix-upstream`: a server ambassador beside its service).
        self.redis_unix = self.work / "redis.sock"
        self.amb_unix_upstream = False
        # redis also answers on 127.0.0.2; an amb server given both addresses as two upstreams
        # of one route while this is set (`bench/ab.py --two-upstreams`: balancing's cost).
        self.amb_two_upstreams = False
        # An amb client finds its server through this discovery ("srv": a dnsmasq SRV record;
        # "etcd": a key in an etcd the bench starts) instead of `--peer HOST:PORT` while set
        # (`bench/ab.py --discovered-peer`: a discovered set's cost).
        self.amb_peer_discovery: str | None = None
        self.etcd_port = 0
        self.iperf_port = 0
        self.tools: dict[str, str] = {}
        self.n = 0
        try:  # measure a private copy, so a rebuild during the run cannot mix two binaries
            import hashlib
            st = self.amb.stat()
            self.amb_binary = {"path": str(self.amb), "sha256": hashlib.sha256(self.amb.read_bytes()).hexdigest()[:16],
                               "mtime": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(st.st_mtime))}
            copy = self.work / "amb"
            shutil.copy2(self.amb, copy)
            self.amb = copy
        except OSError as e:
            self.amb_binary = {"path": str(self.amb), "error": str(e)}

    def path(self, name: str) -> Path:
        return self.work / name

    def uniq(self, stem: str) -> str:
        self.n += 1
        return f"{stem}-{self.n}"

    # -- setup

    def setup(self):
        r = subprocess.run([self.amb, "certs", "init", "--dir", self.certs], capture_output=True,
                           text=True, timeout=30)
        if r.returncode != 0:
            raise BenchError(f"amb certs init failed: {r.stderr.strip()}")
        for role in ("client", "server"):  # haproxy wants chain and key in one file
            combined = self.certs / f"{role}-combined.pem"
            combined.write_bytes((self.certs / f"{role}.pem").read_bytes()
                                 + (self.certs / f"{role}.key").read_bytes())
            combined.chmod(0o600)
        key = self.certs / "spiped.key"
        key.write_bytes(os.urandom(32))
        key.chmod(0o600)

        self.redis_port = free_port()
        self.redis = spawn([self.tools["redis-server"], "--port", self.redis_port, "--bind", HOST, "127.0.0.2",
                            "--save", "", "--appendonly", "no", "--maxclients", "40000",
                            "--protected-mode", "no", "--unixsocket", self.redis_unix,
                            "--unixsocketperm", "700"], self.path("redis.log"))
        wait_ping(self.redis_port, [self.redis])
        self.start_iperf()

    def start_iperf(self, same_port: bool = False):
        """(Re)starts the iperf3 server; same_port keeps running pairs pointed at it."""
        if getattr(self, "iperf", None) is not None:
            stop(self.iperf)
        if not (same_port and self.iperf_port):
            self.iperf_port = free_port()
        self.iperf = spawn([self.tools["iperf3"], "-s", "-B", HOST, "-p", self.iperf_port],
                           self.path(self.uniq("iperf3-server") + ".log"))
        wait_listen(self.iperf_port, self.iperf)

    # -- pair construction

    def start(self, pair: str, upstream: int, link: bool = False, smoke: bool = True) -> Instance:
        inst = Instance(pair)
        try:
            self._start(inst, pair, upstream, link)
            if smoke:
                wait_ping(inst.local_port, inst.procs)
        except BaseException:
            inst.close()
            raise
        return inst

    def _relay(self, inst: Instance, target: int, udp: bool):
        port = free_port(udp_too=udp)
        argv = [sys.executable, LINKEMU, "--delay-ms", LINK_DELAY_MS, "--tcp", f"{port}:{target}"]
        if udp:
            argv += ["--udp", f"{port}:{target}"]
        p = spawn(argv, self.path(self.uniq("linkemu") + ".log"), stdin=subprocess.PIPE,
                  stdout=subprocess.PIPE)
        inst.procs.append(p)
        inst.relay = p
        line = _readline(p, 10)
        ports = json.loads(line)
        inst.relay_tcp_port = ports["tcp"][0]
        return inst.relay_tcp_port

    def _peer(self, tag: str, target: int) -> list:
        """An amb client's peer arguments: `localhost:TARGET` as written, or found through
        the discovery `amb_peer_discovery` names."""
        if self.amb_peer_discovery == "srv":
            port = free_port(udp_too=True)
            conf = self.path(f"{tag}-dnsmasq.conf")
            conf.write_text(f"port={port}\nlisten-address={HOST}\nbind-interfaces\nno-resolv\nno-hosts\n"
                            f"local-ttl=60\nuser=root\npid-file=\nhost-record=localhost,{HOST}\n"
                            f"srv-host=_amb._tcp.{tag}.bench,localhost,{target},10,1\n")
            dns = spawn(["dnsmasq", "-k", f"--conf-file={conf}", "--log-facility=-"],
                        self.path(f"{tag}-dnsmasq.log"))
            wait_log(dns, "started, version")
            return ["--peer", f"srv:_amb._tcp.{tag}.bench", "--dns-server", f"{HOST}:{port}"]
        if self.amb_peer_discovery == "etcd":
            if not self.etcd_port:
                self.etcd_port, peer_port = free_port(), free_port()
                url, peer = f"http://{HOST}:{self.etcd_port}", f"http://{HOST}:{peer_port}"
                etcd = spawn(["etcd", "--name=bench", f"--data-dir={self.path('etcd')}",
                              f"--listen-client-urls={url}", f"--advertise-client-urls={url}",
                              f"--listen-peer-urls={peer}", f"--initial-advertise-peer-urls={peer}",
                              f"--initial-cluster=bench={peer}"], self.path("etcd.log"))
                wait_listen(self.etcd_port, etcd)
            subprocess.run(["etcdctl", f"--endpoints={HOST}:{self.etcd_port}", "put",
                            f"/amb/{tag}/server", f"localhost:{target}"], check=True,
                           capture_output=True, env={**os.environ, "ETCDCTL_API": "3"}, timeout=20)
            return ["--peer", f"etcd://{HOST}:{self.etcd_port}/amb/{tag}"]
        return ["--peer", f"localhost:{target}"]

    def _start(self, inst: Instance, pair: str, upstream: int, link: bool):
        tag = self.uniq(pair)
        c = self.certs
        if pair == "direct":
            inst.local_port = self._relay(inst, upstream, udp=False) if link else upstream
            return
        if pair in REVERSE_PAIRS:
            return self._start_reverse(inst, pair, tag, upstream, link)

        amb = pair in AMB_PAIRS
        srv_port = free_port(udp_too=amb)
        local = free_port()

        # server side
        if pair == "socat":
            argv = [self.tools["socat"], f"TCP-LISTEN:{srv_port},bind={HOST},fork,reuseaddr,backlog=4096,nodelay",
                    f"TCP:{HOST}:{upstream},nodelay"]
        elif pair == "stunnel":
            conf = self.path(f"{tag}-server.conf")
            conf.write_text(_stunnel_conf(False, srv_port, upstream, c))
            argv = [self.tools["stunnel"], conf]
        elif pair == "haproxy":
            conf = self.path(f"{tag}-server.cfg")
            conf.write_text(_haproxy_conf(False, srv_port, upstream, c))
            argv = [self.tools["haproxy"], "-db", "-f", conf]
        elif pair == "spiped":
            argv = [self.tools["spiped"], "-d", "-F", "-s", f"[{HOST}]:{srv_port}", "-t", f"[{HOST}]:{upstream}",
                    "-k", c / "spiped.key", "-n", str(_two_socket_limit())]
        else:
            transport = pair.split("-")[1]
            dial = f"unix:{self.redis_unix}" if self.amb_unix_upstream and upstream == self.redis_port \
                else f"{HOST}:{upstream}"
            if self.amb_two_upstreams and upstream == self.redis_port:
                dial = f"{HOST}:{upstream},127.0.0.2:{upstream}"
            argv = [self.amb, "server", "--listen", f"{HOST}:{srv_port}", "--upstream", dial,
                    "--certs-dir", c, *_transport(transport, self.args.amb_server_arg),
                    *self.args.amb_server_arg]
        server = spawn(argv, self.path(f"{tag}-server.log"))
        inst.procs.append(server)
        if amb:
            wait_log(server, "amb server listening")
        wait_listen(srv_port, server, udp=(pair == "amb-quic"))

        target = self._relay(inst, srv_port, udp=amb) if link else srv_port

        # client side
        if pair == "socat":
            argv = [self.tools["socat"], f"TCP-LISTEN:{local},bind={HOST},fork,reuseaddr,backlog=4096,nodelay",
                    f"TCP:{HOST}:{target},nodelay"]
        elif pair == "stunnel":
            conf = self.path(f"{tag}-client.conf")
            conf.write_text(_stunnel_conf(True, local, target, c))
            argv = [self.tools["stunnel"], conf]
        elif pair == "haproxy":
            conf = self.path(f"{tag}-client.cfg")
            conf.write_text(_haproxy_conf(True, local, target, c))
            argv = [self.tools["haproxy"], "-db", "-f", conf]
        elif pair == "spiped":
            argv = [self.tools["spiped"], "-e", "-F", "-s", f"[{HOST}]:{local}", "-t", f"[{HOST}]:{target}",
                    "-k", c / "spiped.key", "-n", str(_two_socket_limit())]
        else:
            transport = pair.split("-")[1]
            argv = [self.amb, "client", "--listen", f"{HOST}:{local}", *self._peer(tag, target),
                    *_transport(transport, self.args.amb_client_arg), "--certs-dir", c,
                    *self.args.amb_client_arg]
        client = spawn(argv, self.path(f"{tag}-client.log"))
        inst.procs.append(client)
        if amb:
            conns = _amb_connections(self.args.amb_client_arg, pair)
            wait_log(client, "amb client listening")
            wait_log(client, "tunnel connection up", count=conns)
        wait_listen(local, client)
        inst.local_port = local
        inst.sides = [client, server]


    def _start_reverse(self, inst: Instance, pair: str, tag: str, upstream: int, link: bool):
        """A reverse pair: the app side listens for the app and takes the service side's tunnel
        connections; the service side, beside the upstream, dials it (through the emulated link
        with `link`)."""
        c = self.certs
        amb = pair.startswith("amb-")
        accept, local = free_port(udp_too=amb or pair == "rathole-noise"), free_port()
        transport = pair.split("-")[-1]
        if amb:
            argv = [self.amb, "client", "--listen", f"{HOST}:{local}", "--accept", f"{HOST}:{accept}",
                    "--allow", "dns:localhost", *_transport(transport, self.args.amb_client_arg),
                    "--certs-dir", c, *self.args.amb_client_arg]
        else:
            conf = self.path(f"{tag}-app.toml")
            conf.write_text(_rathole_conf(self, True, transport, accept, local))
            argv = [self.tools["rathole"], "--server", conf]
        app = spawn(argv, self.path(f"{tag}-app.log"), env={**os.environ, "RUST_LOG": "warn"} if not amb else None)
        inst.procs.append(app)
        if amb:
            wait_log(app, "accepting service-side ambassadors")
        else:
            wait_listen(accept, app)
        target = self._relay(inst, accept, udp=amb) if link else accept
        if amb:
            argv = [self.amb, "server", "--upstream", f"{HOST}:{upstream}", "--peer", f"localhost:{target}",
                    *_transport(transport, self.args.amb_server_arg), "--certs-dir", c,
                    *self.args.amb_server_arg]
        else:
            conf = self.path(f"{tag}-service.toml")
            conf.write_text(_rathole_conf(self, False, transport, target, upstream))
            argv = [self.tools["rathole"], "--client", conf]
        service = spawn(argv, self.path(f"{tag}-service.log"), env={**os.environ, "RUST_LOG": "warn"} if not amb else None)
        inst.procs.append(service)
        if amb:
            conns = _amb_connections(self.args.amb_server_arg, "amb-quic" if transport == "quic" else "amb-tls")
            wait_log(app, "service-side ambassador connected", count=conns)
        wait_listen(local, app)
        inst.local_port = local
        inst.sides = [app, service]


def _rathole_conf(b: Bench, app_side: bool, transport: str, control: int, service: int) -> str:
    """rathole's configuration: its server is the app side (control port `control`, the app's
    port `service`), its client the service side (dials `control`, forwards to `service`)."""
    keys = _rathole_keys(b)
    if app_side:
        conf = (f'[server]\nbind_addr = "{HOST}:{control}"\ndefault_token = "bench"\n'
                f'[server.services.redis]\nbind_addr = "{HOST}:{service}"\nnodelay = true\n')
        if transport == "noise":
            conf += f'[server.transport]\ntype = "noise"\n[server.transport.noise]\nlocal_private_key = "{keys["private"]}"\n'
        else:
            conf += (f'[server.transport]\ntype = "tls"\n[server.transport.tls]\npkcs12 = "{keys["pkcs12"]}"\n'
                     f'pkcs12_password = "bench"\n')
        return conf
    conf = (f'[client]\nremote_addr = "localhost:{control}"\ndefault_token = "bench"\n'
            f'[client.services.redis]\nlocal_addr = "{HOST}:{service}"\nnodelay = true\n')
    if transport == "noise":
        conf += f'[client.transport]\ntype = "noise"\n[client.transport.noise]\nremote_public_key = "{keys["public"]}"\n'
    else:
        conf += (f'[client.transport]\ntype = "tls"\n[client.transport.tls]\n'
                 f'trusted_root = "{b.certs / "ca.pem"}"\nhostname = "localhost"\n')
    return conf


def _rathole_keys(b: Bench) -> dict:
    """A Noise key pair (`rathole --genkey`) and the server certificate as PKCS#12, made once."""
    if getattr(b, "rathole_keys", None):
        return b.rathole_keys
    out = subprocess.run([b.tools["rathole"], "--genkey"], capture_output=True, text=True, timeout=30).stdout
    lines = [l.strip() for l in out.splitlines() if l.strip()]
    keys = {"private": lines[lines.index("Private Key:") + 1], "public": lines[lines.index("Public Key:") + 1]}
    if "openssl" in b.tools:
        pkcs12 = b.certs / "server.p12"
        subprocess.run([b.tools["openssl"], "pkcs12", "-export", "-out", pkcs12, "-inkey", b.certs / "server.key",
                        "-in", b.certs / "server.pem", "-passout", "pass:bench"], check=True, capture_output=True,
                       timeout=30)
        keys["pkcs12"] = str(pkcs12)
    b.rathole_keys = keys
    return keys


def _transport(transport: str, extra: list[str]) -> list[str]:
    """The pair's --transport, unless the extra arguments give their own (e.g. auto)."""
    given = any(a == "--transport" or a.startswith("--transport=") for a in extra)
    return [] if given else ["--transport", transport]


def _amb_connections(extra: list[str], pair: str) -> int:
    for i, a in enumerate(extra):
        if a == "--connections" and i + 1 < len(extra):
            return int(extra[i + 1])
        if a.startswith("--connections="):
            return int(a.split("=", 1)[1])
    return 1 if pair == "amb-quic" else 2


def _readline(p: subprocess.Popen, timeout: float) -> str:
    r, _, _ = select.select([p.stdout], [], [], timeout)
    if not r:
        raise BenchError(f"no answer from pid {p.pid} within {timeout}s: {log_tail(p)}")
    line = p.stdout.readline()
    if not line:
        raise BenchError(f"pid {p.pid} closed its output: {log_tail(p)}")
    return line.decode() if isinstance(line, bytes) else line


def _stunnel_conf(client: bool, accept: int, connect: int, c: Path) -> str:
    role = "client" if client else "server"
    lines = [
        "foreground = yes", "pid =", "debug = warning", "",
        f"[{role}]",
        f"client = {'yes' if client else 'no'}",
        f"accept = {HOST}:{accept}",
        f"connect = {HOST}:{connect}",
        f"cert = {c / (role + '.pem')}",
        f"key = {c / (role + '.key')}",
        f"CAfile = {c / 'ca.pem'}",
        "verifyChain = yes",
        "sslVersionMin = TLSv1.3",
    ]
    lines += ["checkHost = localhost"] if client else ["requireCert = yes"]
    return "\n".join(lines) + "\n"


def _two_socket_limit() -> int:
    """The connections a relay holding two sockets per connection in one process (haproxy,
    spiped) can take within the fd limit it inherits: it cannot raise the hard limit without
    CAP_SYS_RESOURCE. haproxy warns when its maxconn would not fit; spiped exits on EMFILE."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return max(1000, min(40000, (soft - 200) // 2))


def _haproxy_conf(client: bool, bind: int, connect: int, c: Path) -> str:
    maxconn = _two_socket_limit()
    head = f"""global
    maxconn {maxconn}
    ssl-default-bind-options ssl-min-ver TLSv1.3
    ssl-default-server-options ssl-min-ver TLSv1.3

defaults
    mode tcp
    timeout connect 5s
    timeout client 600s
    timeout server 600s

"""
    if client:  # plaintext in, TLS with a client certificate out
        return head + f"""frontend app
    bind {HOST}:{bind}
    default_backend tunnel

backend tunnel
    server peer {HOST}:{connect} ssl crt {c / 'client-combined.pem'} ca-file {c / 'ca.pem'} verify required verifyhost localhost sni str(localhost)
"""
    return head + f"""frontend tunnel
    bind {HOST}:{bind} ssl crt {c / 'server-combined.pem'} ca-file {c / 'ca.pem'} verify required
    default_backend upstream

backend upstream
    server up {HOST}:{connect}
"""


# ---------------------------------------------------------------- load generators

def redis_benchmark(b: Bench, port: int, args: list[str]) -> dict:
    cmd = [b.tools["redis-benchmark"], "-h", HOST, "-p", str(port), "--csv", *args]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=b.cfg["rb_timeout"])
    except subprocess.TimeoutExpired:
        raise BenchError(f"redis-benchmark {' '.join(args)} timed out after {b.cfg['rb_timeout']}s")
    rows = {}
    for row in csv.reader(io.StringIO(r.stdout)):
        if len(row) >= 8 and row[0] != "test":
            rows[row[0]] = {
                "rps": float(row[1]), "avg_ms": float(row[2]), "min_ms": float(row[3]),
                "p50_ms": float(row[4]), "p95_ms": float(row[5]), "p99_ms": float(row[6]),
                "max_ms": float(row[7]),
            }
    err = (r.stderr or "").strip().splitlines()
    if r.returncode != 0 or not rows:
        raise BenchError(f"redis-benchmark rc={r.returncode}: {' | '.join(err[-3:]) or r.stdout[-200:]}")
    return rows


def iperf(b: Bench, port: int, reverse: bool) -> dict:
    secs = b.cfg["iperf_secs"]
    cmd = [b.tools["iperf3"], "-c", HOST, "-p", str(port), "-t", str(secs), "-J", "--connect-timeout", "5000"]
    if reverse:
        cmd.append("-R")
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=secs + 30)
    except subprocess.TimeoutExpired:
        b.start_iperf(same_port=True)  # a stuck test leaves the server busy
        raise BenchError(f"iperf3 timed out after {secs + 30}s")
    try:
        j = json.loads(r.stdout)
    except json.JSONDecodeError:
        raise BenchError(f"iperf3 rc={r.returncode}: {(r.stderr or r.stdout)[-200:]}")
    if "error" in j:
        raise BenchError(f"iperf3: {j['error']}")
    rec = j["end"]["sum_received"]
    return {"gbit_s": rec["bits_per_second"] / 1e9, "bytes": int(rec["bytes"]),
            "retransmits": j["end"].get("sum_sent", {}).get("retransmits")}


# ---------------------------------------------------------------- connection holding (metric 5)

async def _open_ping(port: int, timeout: float):
    r, w = await asyncio.wait_for(asyncio.open_connection(HOST, port), timeout)
    try:
        w.write(b"PING\r\n")
        line = await asyncio.wait_for(r.readline(), timeout)
        if not line.startswith(b"+PONG"):
            raise BenchError(f"reply {line!r}")
    except BaseException:
        w.transport.abort()
        raise
    return r, w


async def _open_many(port: int, count: int, conns: list, errors: dict, deadline: float, parallel=64,
                     give_up_after=128):
    """Opens count connections (PING/PONG each), parallel at a time; stops trying after
    give_up_after failures or at the deadline, so a pair that stalls cannot stall the run."""
    sem = asyncio.Semaphore(parallel)
    failures = [0]

    def count_error(key):
        errors[key] = errors.get(key, 0) + 1

    async def one():
        async with sem:
            left = deadline - time.monotonic()
            if left <= 0:
                return count_error("not tried: deadline")
            if failures[0] >= give_up_after:
                return count_error(f"not tried: gave up after {give_up_after} failures")
            try:
                conns.append(await _open_ping(port, min(10.0, left)))
            except Exception as e:
                failures[0] += 1
                count_error((type(e).__name__ + (f": {e}" if str(e) else ""))[:80])
    await asyncio.gather(*(one() for _ in range(count)))


async def _ping_all(conns: list, timeout: float) -> int:
    async def one(rw):
        r, w = rw
        try:
            w.write(b"PING\r\n")
            line = await asyncio.wait_for(r.readline(), timeout)
            return line.startswith(b"+PONG")
        except Exception:
            return False
    return sum(await asyncio.gather(*(one(c) for c in conns)))


async def hold_connections(b: Bench, inst: Instance) -> dict:
    idle, total = b.cfg["idle_conns"], b.cfg["concurrent_conns"]
    roots = [p.pid for p in inst.sides]
    out: dict = {}
    conns: list = []
    errors: dict = {}
    try:
        before = memory(roots) if roots else None
        t0 = time.monotonic()
        await _open_many(inst.local_port, idle, conns, errors, time.monotonic() + 90)
        out["idle_opened"] = len(conns)
        out["idle_open_secs"] = round(time.monotonic() - t0, 2)
        if roots:
            after = memory(roots)
            out["mem_before"], out["mem_idle"] = before, after
            if conns:
                out["kib_per_conn"] = round((after["kib"] - before["kib"]) / len(conns), 2)
                out["mem_basis"] = after["basis"]
        await _open_many(inst.local_port, total - len(conns), conns, errors, time.monotonic() + 120)
        out["concurrent_open"] = len(conns)
        out["concurrent_answered"] = await _ping_all(conns, 30.0)
        out["concurrent_target"] = total
        if roots:
            out["mem_concurrent"] = memory(roots)
        if errors:
            out["open_errors"] = errors
    finally:
        for _, w in conns:
            w.transport.abort()
    return out


# ---------------------------------------------------------------- link metrics (7, 8)

def first_and_warm(port: int, n: int) -> tuple[list[float], list[float]]:
    """n fresh-connection first replies, each paired with one request on a warm connection
    right before it, so both see the same link conditions (the relay is a user-space process
    and a busy machine slows it)."""
    firsts, warms = [], []
    with socket.create_connection((HOST, port), timeout=5) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(n):
            t0 = time.perf_counter()
            s.sendall(b"PING\r\n")
            buf = b""
            while b"\r\n" not in buf:
                chunk = s.recv(64)
                if not chunk:
                    raise BenchError("warm connection closed")
                buf += chunk
            warms.append(time.perf_counter() - t0)
            firsts.append(ping_once(port, timeout=5))
    return firsts, warms


async def loss_streams(port: int, streams: int, secs: float, lossy) -> dict:
    """streams connections, opened on the clean link, then each sends PINGs back to back for
    secs seconds inside the `lossy` context (which turns the loss on and off)."""
    lat: list[float] = []
    timeouts = 0
    conns = [await _open_ping(port, 10) for _ in range(streams)]

    async def run(rw):
        nonlocal timeouts
        r, w = rw
        for _ in range(100_000):
            if time.monotonic() >= end:
                return
            t0 = time.perf_counter()
            w.write(b"PING\r\n")
            try:
                line = await asyncio.wait_for(r.readline(), 10)
            except asyncio.TimeoutError:
                timeouts += 1
                return
            if not line.startswith(b"+PONG"):
                raise BenchError(f"reply {line!r}")
            lat.append(time.perf_counter() - t0)
    try:
        with lossy:
            end = time.monotonic() + secs
            await asyncio.gather(*(run(c) for c in conns))
    finally:
        for _, w in conns:
            w.transport.abort()
    lat.sort()
    if not lat:
        raise BenchError("no request completed")
    q = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))] * 1e3  # noqa: E731
    return {"requests": len(lat), "timeouts": timeouts, "p50_ms": round(q(0.5), 2),
            "p99_ms": round(q(0.99), 2), "max_ms": round(lat[-1] * 1e3, 2)}


class TcpLoss:
    """iptables rule dropping 1% of TCP segments to and from the relay's port, removed on exit."""

    def __init__(self, port: int, prob: float):
        self.specs = [
            ["OUTPUT", "-o", "lo", "-p", "tcp", direction, str(port), "-m", "statistic", "--mode", "random",
             "--probability", str(prob), "-m", "comment", "--comment", "amb-bench", "-j", "DROP"]
            for direction in ("--dport", "--sport")
        ]
        self.added: list[list[str]] = []
        self.port_text = f"pt:{port} "
        self.count: int | None = None

    def __enter__(self):
        for spec in self.specs:
            r = subprocess.run(["iptables", "-w", "5", "-I", *spec], capture_output=True, text=True, timeout=15)
            if r.returncode != 0:
                raise BenchError(f"iptables: {r.stderr.strip()}")
            self.added.append(spec)
        return self

    def dropped(self) -> int | None:
        """Packets the rules dropped so far (evidence the loss really applied)."""
        try:
            r = subprocess.run(["iptables", "-w", "5", "-L", "OUTPUT", "-n", "-v", "-x"], capture_output=True,
                               text=True, timeout=15)
        except (OSError, subprocess.TimeoutExpired):
            return None
        total = 0
        for line in r.stdout.splitlines():
            parts = line.split()
            if "amb-bench" in line and parts and parts[0].isdigit() and self.port_text in line:
                total += int(parts[0])
        return total

    def __exit__(self, *exc):
        self.count = self.dropped()
        for spec in self.added:
            subprocess.run(["iptables", "-w", "5", "-D", *spec], capture_output=True, timeout=15)


class LinkLoss:
    """Turns the emulated loss on: UDP drops in the relay, TCP drops by iptables (when usable)."""

    def __init__(self, inst: Instance, tcp_ok: bool):
        self.inst = inst
        self.tcp = TcpLoss(inst.relay_tcp_port, LINK_LOSS) if tcp_ok else None

    def _udp(self, p: float) -> dict:
        self.inst.relay.stdin.write(f"loss {p}\n".encode())
        self.inst.relay.stdin.flush()
        words = _readline(self.inst.relay, 5).split()
        return {k: int(v) for k, v in zip(words[3::2], words[4::2])}

    def __enter__(self):
        self.udp_before = self._udp(LINK_LOSS)
        if self.tcp:
            self.tcp.__enter__()
        return self

    def __exit__(self, *exc):
        try:
            if self.tcp:
                self.tcp.__exit__(*exc)
        finally:
            after = self._udp(0.0)
            self.udp = {k: after[k] - self.udp_before.get(k, 0) for k in after}


def iptables_usable() -> str | None:
    """None when iptables can add rules here, else why not."""
    if os.geteuid() != 0:
        return "not root"
    if not shutil.which("iptables"):
        return "iptables not installed"
    try:
        r = subprocess.run(["iptables", "-w", "5", "-L", "OUTPUT", "-n"], capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.TimeoutExpired) as e:
        return str(e)
    if r.returncode != 0:
        return r.stderr.strip()
    # the statistic match needs xt_statistic; try it on a port nobody uses
    probe = TcpLoss(1, 0.01)
    try:
        with probe:
            pass
    except BenchError as e:
        return str(e)
    return None


# ---------------------------------------------------------------- the run

def measure(fn, store: dict, key: str):
    """Runs one metric; a failure is recorded as an error, never fatal."""
    try:
        store[key] = fn()
    except Exception as e:  # noqa: BLE001 - recorded in the table
        store[key] = {"error": f"{type(e).__name__}: {e}"[:300]}
        log(f"  {key}: ERROR {store[key]['error']}")


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"[:300]


def _median_rows(runs: list[dict]) -> dict:
    """test -> field -> median over rounds (redis-benchmark rows)."""
    out: dict = {}
    for test in runs[0]:
        rows = [r[test] for r in runs if test in r]
        out[test] = {f: round(statistics.median(row[f] for row in rows), 3) for f in rows[0]}
    return out


def _rotated(items: list, r: int) -> list:
    k = r % len(items) if items else 0
    return items[k:] + items[:k]


def phase_redis(b: Bench, pairs: list[str], results: dict):
    """Metrics 1-3 with every pair up at once, in interleaved rounds (pair order rotated each
    round), so background load drifting over time hits all pairs alike; medians are kept."""
    cfg = b.cfg
    insts: dict[str, Instance] = {}
    try:
        for pair in pairs:
            try:
                insts[pair] = b.start(pair, b.redis_port)
                results[pair]["smoke"] = "ok"
            except Exception as e:  # noqa: BLE001
                results[pair]["smoke"] = f"error: {_error(e)}"
                log(f"{pair}: failed to start or answer: {e}")
        live = [p for p in pairs if p in insts]
        metrics = [
            ("get_c50", ["-t", "get", "-c", "50", "-n", str(cfg["get_n"])]),
            ("get_p32", ["-t", "get", "-c", "50", "-P", "32", "-n", str(cfg["p32_n"])]),
            ("ping_c1", ["-t", "ping", "-c", "1", "-n", str(cfg["ping_n"])]),
            ("newconn", ["-k", "0", "-t", "ping", "-c", "50", "-n", str(cfg["newconn_n"])]),
        ]
        for key, rb_args in metrics:
            runs: dict[str, list] = {p: [] for p in live}
            errs: dict[str, list] = {p: [] for p in live}
            for r in range(cfg["rounds"]):
                log(f"redis-benchmark {' '.join(rb_args)}: round {r + 1}/{cfg['rounds']}")
                for pair in _rotated(live, r):
                    try:
                        runs[pair].append(redis_benchmark(b, insts[pair].local_port, rb_args))
                    except Exception as e:  # noqa: BLE001
                        errs[pair].append(_error(e))
                        log(f"  {pair} {key}: ERROR {errs[pair][-1]}")
            for pair in live:
                if runs[pair]:
                    res = _median_rows(runs[pair])
                    res["rounds"] = runs[pair]
                    if errs[pair]:
                        res["round_errors"] = errs[pair]
                else:
                    res = {"error": errs[pair][0] if errs[pair] else "not run"}
                results[pair][key] = res
        for pair in live:  # did every ambassador survive the load?
            dead = [f"{p.args[0]} rc={p.returncode}" for p in insts[pair].procs if p.poll() is not None]
            if dead:
                results[pair]["redis_phase_exited"] = dead
    finally:
        for inst in insts.values():
            inst.close()


def phase_iperf(b: Bench, pairs: list[str], results: dict):
    """Metrics 4 and 6: iperf3 both directions through every pair, interleaved rounds; CPU of
    both ambassador sides (process trees) around each transfer."""
    cfg = b.cfg
    b.start_iperf()
    insts: dict[str, Instance] = {}
    acc: dict[str, dict] = {}
    try:
        for pair in pairs:
            if results[pair].get("smoke") != "ok":
                continue
            try:
                insts[pair] = b.start(pair, b.iperf_port, smoke=False)
                acc[pair] = {"fwd": [], "rev": [], "errors": [], "cpu": 0.0, "bytes": 0}
            except Exception as e:  # noqa: BLE001
                results[pair]["iperf"] = {"error": _error(e)}
        live = list(insts)
        for r in range(cfg["iperf_rounds"]):
            log(f"iperf3 -t {cfg['iperf_secs']}, both directions: round {r + 1}/{cfg['iperf_rounds']}")
            for pair in _rotated(live, r):
                roots = [p.pid for p in insts[pair].sides]
                for name, rev in (("fwd", False), ("rev", True)):
                    c0 = cpu_seconds(roots) if roots else 0.0
                    try:
                        res = iperf(b, insts[pair].local_port, rev)
                    except Exception as e:  # noqa: BLE001
                        acc[pair]["errors"].append(f"{name}: {_error(e)}")
                        log(f"  {pair} iperf3 {name}: ERROR {acc[pair]['errors'][-1]}")
                        continue
                    if roots:  # let forked per-connection children exit and be reaped
                        try:
                            wait_until(lambda: len(tree_pids(roots)) <= len(roots), "children reaped", 5)
                        except BenchError:
                            pass
                        res["cpu_s"] = round(cpu_seconds(roots) - c0, 3)
                        acc[pair]["cpu"] += res["cpu_s"]
                    acc[pair]["bytes"] += res["bytes"]
                    acc[pair][name].append(res)
        for pair in live:
            a = acc[pair]
            out: dict = {}
            for name in ("fwd", "rev"):
                if a[name]:
                    out[name] = {"gbit_s": round(statistics.median(x["gbit_s"] for x in a[name]), 3), "rounds": a[name]}
                else:
                    out[name] = {"error": next((e for e in a["errors"] if e.startswith(name)), "not run")}
            if insts[pair].sides and a["bytes"]:
                out["cpu_s_per_gb"] = round(a["cpu"] / (a["bytes"] / 1e9), 3)
            if a["errors"]:
                out["round_errors"] = a["errors"]
            results[pair]["iperf"] = out
    finally:
        for inst in insts.values():
            inst.close()


def phase_conns(b: Bench, pair: str, res: dict):
    """Metric 5 on a fresh instance: memory per idle connection, then N concurrent answering."""
    def conns():
        with b.start(pair, b.redis_port) as inst:
            out = asyncio.run(hold_connections(b, inst))
            out["exited"] = [f"{p.args[0]} rc={p.returncode}: {log_tail(p, 2)}" for p in inst.procs
                             if p.poll() is not None]
            return out
    log(f"{pair}: {b.cfg['idle_conns']} idle / {b.cfg['concurrent_conns']} concurrent connections")
    measure(conns, res, "conns")


def phase_link(b: Bench, pair: str, res: dict, loss_reason: str | None):
    """Metrics 7 and 8: the emulated 20 ms link between the two sides; first reply, then 1% loss."""
    cfg = b.cfg

    def link():
        with b.start(pair, b.redis_port, link=True) as inst:
            out = {}
            firsts, warms = first_and_warm(inst.local_port, cfg["first_reply_n"])
            med, warm = statistics.median(firsts), statistics.median(warms)
            out.update(first_reply_ms=round(med * 1e3, 2), first_reply_rtts=round(med * 1e3 / (2 * LINK_DELAY_MS), 2),
                       first_reply_vs_warm=round(med / warm, 2), warm_rtt_ms=round(warm * 1e3, 2),
                       first_reply_all_ms=[round(x * 1e3, 2) for x in firsts],
                       warm_all_ms=[round(x * 1e3, 2) for x in warms])
            if cfg["loss_secs"] > 0:
                try:
                    lossy = LinkLoss(inst, tcp_ok=loss_reason is None)
                    out["loss"] = asyncio.run(loss_streams(inst.local_port, cfg["loss_streams"], cfg["loss_secs"], lossy))
                    out["loss"]["tcp_loss"] = ("iptables 1% each way" if loss_reason is None
                                               else f"not emulated ({loss_reason})")
                    out["loss"]["tcp_segments_dropped"] = lossy.tcp.count if lossy.tcp else None
                    out["loss"]["udp_datagrams"] = getattr(lossy, "udp", None)
                except Exception as e:  # noqa: BLE001
                    out["loss"] = {"error": _error(e)}
                    log(f"  loss: ERROR {out['loss']['error']}")
            return out
    log(f"{pair}: emulated link")
    measure(link, res, "link")


# ---------------------------------------------------------------- reporting

def _v(d, *path):
    for k in path:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def _err(d, *path):
    for k in path:
        if not isinstance(d, dict):
            return None
        if "error" in d:
            return d["error"]
        d = d.get(k)
    return d.get("error") if isinstance(d, dict) else None


def derive(results: dict):
    """Per-pair numbers for the table (None = not measured, 'ERR' = failed)."""
    direct_p50 = _v(results, "direct", "ping_c1", "PING_MBULK", "p50_ms")
    rows = {}
    for pair, r in results.items():
        row = {}

        def put(name, path, scale=1.0, nd=0):
            v = _v(r, *path)
            if isinstance(v, (int, float)):
                row[name] = round(v * scale, nd) if nd else int(round(v * scale))
            elif _err(r, *path) or (isinstance(r.get("smoke"), str) and r["smoke"] != "ok"):
                row[name] = "ERR"
            else:
                row[name] = None
        put("get_c50_rps", ["get_c50", "GET", "rps"])
        put("get_p32_rps", ["get_p32", "GET", "rps"])
        put("ping_p50_us", ["ping_c1", "PING_MBULK", "p50_ms"], 1000)
        put("ping_p99_us", ["ping_c1", "PING_MBULK", "p99_ms"], 1000)
        p50 = _v(r, "ping_c1", "PING_MBULK", "p50_ms")
        row["added_p50_us"] = (int(round((p50 - direct_p50) * 1000)) if p50 is not None and direct_p50 is not None
                               else row["ping_p50_us"] if row["ping_p50_us"] == "ERR" else None)
        nc = [_v(r, "newconn", t, "rps") for t in ("PING_INLINE", "PING_MBULK")]
        nc = [x for x in nc if x is not None]
        row["new_conns_s"] = int(round(statistics.mean(nc))) if nc else ("ERR" if _err(r, "newconn") or r.get("smoke") != "ok" else None)
        put("iperf_fwd_gbit", ["iperf", "fwd", "gbit_s"], 1, 2)
        put("iperf_rev_gbit", ["iperf", "rev", "gbit_s"], 1, 2)
        put("cpu_s_per_gb", ["iperf", "cpu_s_per_gb"], 1, 2)
        put("kib_per_conn", ["conns", "kib_per_conn"], 1, 1)
        ans, tgt = _v(r, "conns", "concurrent_answered"), _v(r, "conns", "concurrent_target")
        row["concurrent_answered"] = (f"{ans}/{tgt}" if ans is not None else ("ERR" if _err(r, "conns") or r.get("smoke") != "ok" else None))
        put("first_reply_ms", ["link", "first_reply_ms"], 1, 1)
        put("first_reply_rtts", ["link", "first_reply_rtts"], 1, 2)
        put("first_reply_vs_warm", ["link", "first_reply_vs_warm"], 1, 2)
        put("loss_p99_ms", ["link", "loss", "p99_ms"], 1, 1)
        rows[pair] = row
    return rows


COLUMNS = [
    ("GET c50 rps", "get_c50_rps"), ("GET P32 rps", "get_p32_rps"), ("ping p50 µs", "ping_p50_us"),
    ("ping p99 µs", "ping_p99_us"), ("+p50 µs", "added_p50_us"), ("new conn/s", "new_conns_s"),
    ("iperf Gb/s", "iperf_fwd_gbit"), ("iperf -R Gb/s", "iperf_rev_gbit"), ("CPU s/GB", "cpu_s_per_gb"),
    ("KiB/conn", "kib_per_conn"), ("concurrent", "concurrent_answered"),
    ("1st reply ms", "first_reply_ms"), ("1st reply RTT", "first_reply_rtts"), ("1st/warm", "first_reply_vs_warm"),
    ("1% loss p99 ms", "loss_p99_ms"),
]


def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def table(rows: dict) -> str:
    head = "| pair | " + " | ".join(c for c, _ in COLUMNS) + " |"
    sep = "|---|" + "|".join("---:" for _ in COLUMNS) + "|"
    lines = [head, sep]
    for pair, row in rows.items():
        lines.append(f"| {pair} | " + " | ".join(_fmt(row.get(k)) for _, k in COLUMNS) + " |")
    return "\n".join(lines)


def per_round(results: dict) -> dict:
    """The targets' figures round by round: {pair: {key: [value per round]}}. Rounds are
    interleaved across pairs, so the i-th figures of two pairs were measured close together and
    their ratio shows how far a target's verdict swings on this machine."""
    def rps_rounds(r, metric, tests):
        rounds = (r.get(metric) or {}).get("rounds") or []
        vals = [[rd.get(t, {}).get("rps") for t in tests] for rd in rounds]
        return [statistics.mean(v) if all(isinstance(x, (int, float)) for x in v) else None for v in vals]

    def p50_rounds(r):
        return [rd.get("PING_MBULK", {}).get("p50_ms") for rd in ((r.get("ping_c1") or {}).get("rounds") or [])]

    direct_p50 = p50_rounds(results.get("direct", {}))
    out = {}
    for pair, r in results.items():
        iperf = r.get("iperf") or {}
        out[pair] = {
            "get_c50_rps": rps_rounds(r, "get_c50", ["GET"]),
            "get_p32_rps": rps_rounds(r, "get_p32", ["GET"]),
            "new_conns_s": rps_rounds(r, "newconn", ["PING_INLINE", "PING_MBULK"]),
            "iperf_fwd_gbit": [x.get("gbit_s") for x in (iperf.get("fwd") or {}).get("rounds") or []],
            "iperf_rev_gbit": [x.get("gbit_s") for x in (iperf.get("rev") or {}).get("rounds") or []],
            "added_p50_us": [round((a - d) * 1000) if a is not None and d is not None else None
                             for a, d in zip(p50_rounds(r), direct_p50)],
        }
    return out


def targets(rows: dict, rounds: dict | None = None) -> list[dict]:
    out = []
    rounds = rounds or {}

    def round_ratios(a_pair, b_pair, key):
        a_r, b_r = rounds.get(a_pair, {}).get(key, []), rounds.get(b_pair, {}).get(key, [])
        return [round(a / b, 2) if a is not None and b else None for a, b in zip(a_r, b_r)]

    def with_rounds(detail, values):
        shown = [_fmt(v) for v in values]
        return f"{detail}; rounds {', '.join(shown)}" if len(values) > 1 else detail

    def num(pair, key):
        v = rows.get(pair, {}).get(key)
        return v if isinstance(v, (int, float)) else None

    def ratio(name, a_pair, key, b_pair, goal, amb=None):
        a, b_ = num(a_pair, key), num(b_pair, key)
        if a is None or b_ in (None, 0):
            out.append({"target": name, "goal": f"≥{goal}×", "value": None, "met": None,
                        "detail": f"{a_pair}/{b_pair} not measured"})
            return
        r = a / b_
        by_round = round_ratios(a_pair, b_pair, key)
        out.append({"target": name, "goal": f"≥{goal}×", "value": round(r, 2), "met": r >= goal,
                    "rounds": by_round,
                    "detail": with_rounds(f"{a_pair} {_fmt(a)} / {b_pair} {_fmt(b_)}", by_round)})

    def absolute(name, pair, key, goal, unit):
        v = num(pair, key)
        by_round = rounds.get(pair, {}).get(key, [])
        out.append({"target": name, "goal": f"≤{goal} {unit}", "value": v, "rounds": by_round,
                    "met": None if v is None else v <= goal,
                    "detail": with_rounds(f"{pair} {_fmt(v)} {unit}", by_round)})

    for amb in AMB_PAIRS:
        ratio(f"{amb} GET -c 50 vs haproxy", amb, "get_c50_rps", "haproxy", 1.3)
        ratio(f"{amb} GET -P 32 vs haproxy", amb, "get_p32_rps", "haproxy", 1.3)
        absolute(f"{amb} added p50 latency vs direct", amb, "added_p50_us", 30, "µs")
        ratio(f"{amb} new conns/s vs direct", amb, "new_conns_s", "direct", 0.5)
        ratio(f"{amb} new conns/s vs haproxy", amb, "new_conns_s", "haproxy", 10)
    ratio("amb-tls iperf3 vs haproxy", "amb-tls", "iperf_fwd_gbit", "haproxy", 1.5)
    ratio("amb-tls iperf3 -R vs haproxy", "amb-tls", "iperf_rev_gbit", "haproxy", 1.5)
    ratio("amb-quic iperf3 vs amb-tls", "amb-quic", "iperf_fwd_gbit", "amb-tls", 0.5)
    ratio("amb-quic iperf3 -R vs amb-tls", "amb-quic", "iperf_rev_gbit", "amb-tls", 0.5)
    for amb in AMB_PAIRS:
        absolute(f"{amb} idle memory per connection (both sides)", amb, "kib_per_conn", 16, "KiB")
        absolute(f"{amb} first reply across 20 ms RTT link", amb, "first_reply_rtts", 1.2, "RTT")
    # Reverse tunnels: within 3% of the forward layout; ahead of rathole (when it ran).
    for rev, fwd in (("amb-rev-tls", "amb-tls"), ("amb-rev-quic", "amb-quic")):
        for key, what in (("get_c50_rps", "GET -c 50"), ("get_p32_rps", "GET -P 32"),
                          ("new_conns_s", "new conns/s"), ("iperf_fwd_gbit", "iperf3")):
            ratio(f"{rev} {what} vs {fwd}", rev, key, fwd, 0.97)
        for rathole in EXTRA_PAIRS:
            if rathole in rows:
                ratio(f"{rev} new conns/s vs {rathole}", rev, "new_conns_s", rathole, 3)
                ratio(f"{rathole} idle memory per connection vs {rev}", rathole, "kib_per_conn", rev, 10)
    return out


def targets_table(ts: list[dict]) -> str:
    lines = ["| target | goal | value | met | figures |", "|---|---|---:|---|---|"]
    for t in ts:
        met = "–" if t["met"] is None else ("met" if t["met"] else "MISSED")
        lines.append(f"| {t['target']} | {t['goal']} | {_fmt(t['value'])} | {met} | {t['detail']} |")
    return "\n".join(lines)


def errors_list(results: dict) -> list[str]:
    out = []

    def walk(pair, d, path):
        if isinstance(d, dict):
            if "error" in d and isinstance(d["error"], str):
                out.append(f"{pair} {'/'.join(path)}: {d['error']}")
            for k, v in d.items():
                if k != "error":
                    walk(pair, v, path + [k])
    for pair, r in results.items():
        if isinstance(r.get("smoke"), str) and r["smoke"] != "ok":
            out.append(f"{pair}: {r['smoke']}")
        walk(pair, r, [])
    return out


def machine_info(b: Bench) -> dict:
    cpu = ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass

    def ver(argv, pat=None):
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=10)
            text = (r.stdout + r.stderr).strip()
        except Exception as e:  # noqa: BLE001
            return f"unavailable ({e})"
        lines = [l for l in text.splitlines() if l.strip()]
        if pat:
            lines = [l for l in lines if re.search(pat, l)] or lines
        return lines[0].strip() if lines else ""
    t = b.tools
    versions = {
        "amb": ver([b.amb, "--version"]),
        "redis-server": ver([t["redis-server"], "--version"]) if "redis-server" in t else None,
        "redis-benchmark": ver([t["redis-benchmark"], "--version"]) if "redis-benchmark" in t else None,
        "iperf3": ver([t["iperf3"], "--version"]) if "iperf3" in t else None,
        "socat": ver([t["socat"], "-V"], r"socat version") if "socat" in t else None,
        "stunnel": ver([t["stunnel"], "-version"], r"^stunnel \d") if "stunnel" in t else None,
        "stunnel-openssl": ver([t["stunnel"], "-version"], r"Running\s+with|Compiled with") if "stunnel" in t else None,
        "haproxy": ver([t["haproxy"], "-v"], r"HAProxy version") if "haproxy" in t else None,
        "spiped": ver([t["spiped"], "-v"]) if "spiped" in t else None,
        "python": platform.python_version(),
    }
    amb_bin = b.amb_binary
    return {"nproc": os.cpu_count(), "cpu_model": cpu, "kernel": platform.release(), "versions": versions,
            "cpu_idle": cpu_idle_info(), "amb_binary": amb_bin, "loadavg_end": _loadavg()}


def cpu_idle_info() -> dict:
    """How idle CPUs wait: it sets what waking a process on the other CPU costs, which every
    relay pays once per hop (BENCHMARKS.md: with a VM's halt-polling off, about 23 µs a wake)."""
    def read(path):
        try:
            return Path(path).read_text().strip()
        except OSError:
            return None
    return {
        "driver": read("/sys/devices/system/cpu/cpuidle/current_driver"),
        "governor": read("/sys/devices/system/cpu/cpuidle/current_governor"),
        "guest_halt_poll_ns": read("/sys/module/haltpoll/parameters/guest_halt_poll_ns"),
    }


# ---------------------------------------------------------------- main

def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return ""


def find_tools(install: bool) -> tuple[dict, list[str]]:
    def look():
        found = {}
        for tool in TOOLS:
            path = shutil.which(tool) or (shutil.which("stunnel4") if tool == "stunnel" else None)
            if path:
                found[tool] = path
        return found
    found = look()
    missing = [t for t in TOOLS if t not in found]
    packaged = [t for t in missing if TOOLS[t]]
    if packaged and install and os.geteuid() == 0 and shutil.which("apt-get"):
        pkgs = sorted({TOOLS[t] for t in packaged})
        log(f"installing {' '.join(pkgs)} with apt-get")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update", "-qq"], env=env, timeout=600, capture_output=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", *pkgs], env=env, timeout=900, capture_output=True)
        found = look()
        missing = [t for t in TOOLS if t not in found]
    return found, missing


def raise_nofile():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 200_000
    try:
        if hard != resource.RLIM_INFINITY and hard < want and os.geteuid() == 0:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
        else:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else want, hard))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def main() -> int:
    ap = argparse.ArgumentParser(description="Side-by-side loopback benchmark of amb and other tunnel pairs.")
    ap.add_argument("--quick", action="store_true", help="small smoke run (~2 min); non-zero exit if a pair fails to answer")
    ap.add_argument("--json", metavar="FILE", help="write all results as JSON")
    ap.add_argument("--chart", metavar="FILE", help="draw the table as bar charts (PNG or SVG; needs matplotlib)")
    ap.add_argument("--pairs", default=",".join(PAIRS),
                    help=f"comma-separated subset of {','.join(PAIRS + EXTRA_PAIRS)} (the last {len(EXTRA_PAIRS)} only when named)")
    ap.add_argument("--amb", default=str(REPO / "target" / "release" / "amb"), help="amb binary")
    ap.add_argument("--amb-server-arg", action="append", default=[], help="extra amb server argument (repeatable)")
    ap.add_argument("--amb-client-arg", action="append", default=[], help="extra amb client argument (repeatable)")
    ap.add_argument("--no-install", action="store_true", help="never apt-get install missing peers")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs, configs)")
    args = ap.parse_args()
    cfg = QUICK if args.quick else FULL
    pairs = [p.strip() for p in args.pairs.split(",") if p.strip()]
    unknown = [p for p in pairs if p not in PAIRS + EXTRA_PAIRS]
    if unknown:
        ap.error(f"unknown pairs: {unknown}")

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if not Path(args.amb).exists():
        print(f"bench: {args.amb} not found; build it with `cargo build --release`", file=sys.stderr)
        return 2
    tools, missing = find_tools(install=not args.no_install)
    if missing:
        how = lambda t: f"apt-get install {TOOLS[t]}" if TOOLS[t] else f"cargo install {t}"  # noqa: E731
        print("bench: missing: " + ", ".join(f"{t} ({how(t)})" for t in missing), file=sys.stderr)
    if "redis-server" in missing or "redis-benchmark" in missing or "iperf3" in missing:
        print("bench: redis-server, redis-benchmark and iperf3 are required", file=sys.stderr)
        return 2
    nofile = raise_nofile()
    loss_reason = iptables_usable()
    if loss_reason:
        log(f"TCP loss will not be emulated: {loss_reason}")

    notes = []
    if nofile[0] < 2 * cfg["concurrent_conns"] + 100:
        notes.append(f"RLIMIT_NOFILE is {nofile[0]} and cannot be raised here: a single-process relay holding two "
                     f"sockets per connection (stunnel, haproxy, spiped) tops out near {nofile[0] // 2} connections "
                     "in the concurrency check")
    if loss_reason:
        notes.append(f"TCP loss not emulated: {loss_reason}")
    b = Bench(args, cfg)
    b.tools = tools
    results: dict = {}
    phases: dict = {}
    started = time.monotonic()
    failed = False
    try:
        b.setup()
        log(f"work dir {b.work}; redis :{b.redis_port}, iperf3 :{b.iperf_port}; RLIMIT_NOFILE {nofile}")
        runnable = []
        for pair in pairs:
            results[pair] = {}
            lacking = [t for t in NEEDS[pair] if t not in tools]
            if lacking:
                results[pair]["smoke"] = f"error: not installed: {', '.join(lacking)}"
            else:
                runnable.append(pair)
        phases["loadavg_start"] = _loadavg()
        t0 = time.monotonic()
        phase_redis(b, runnable, results)
        phases["redis_s"] = round(time.monotonic() - t0, 1)
        t0 = time.monotonic()
        phase_iperf(b, runnable, results)
        phases["iperf_s"] = round(time.monotonic() - t0, 1)
        phases["loadavg_after_interleaved"] = _loadavg()
        for pair in runnable:
            if results[pair].get("smoke") != "ok":
                continue
            t0 = time.monotonic()
            results[pair]["loadavg_before_conns"] = _loadavg()
            phase_conns(b, pair, results[pair])
            phase_link(b, pair, results[pair], loss_reason)
            results[pair]["conns_link_s"] = round(time.monotonic() - t0, 1)
            log(f"{pair}: done in {results[pair]['conns_link_s']}s")
    except KeyboardInterrupt:
        log("interrupted")
        failed = True
    except BenchError as e:
        log(f"setup failed: {e}")
        failed = True
    finally:
        stop_all()

    rows = derive(results)
    ts = targets(rows, per_round(results))
    errs = errors_list(results)
    mach = machine_info(b)
    doc = {
        "mode": "quick" if args.quick else "full", "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "elapsed_s": round(time.monotonic() - started, 1), "config": cfg, "machine": mach,
        "link": {"delay_ms_each_way": LINK_DELAY_MS, "loss": LINK_LOSS,
                 "tcp_loss": "iptables statistic DROP on the relay port" if not loss_reason else f"not emulated: {loss_reason}"},
        "amb_extra_args": {"server": args.amb_server_arg, "client": args.amb_client_arg},
        "rlimit_nofile": list(nofile),
        "phases": phases,
        "notes": notes,
        "table": rows, "targets": ts, "errors": errs, "results": results,
    }
    print()
    print(table(rows))
    print()
    print(targets_table(ts))
    if errs:
        print("\nerrors:")
        for e in errs:
            print(f"  - {e}")
    for n in notes:
        print(f"\nnote: {n}")
    idle = mach["cpu_idle"]
    print(f"\n{mach['nproc']} cpu, {mach['cpu_model']}, kernel {mach['kernel']}; cpuidle {idle['driver']}"
          f" (guest_halt_poll_ns {idle['guest_halt_poll_ns']}); {doc['elapsed_s']}s")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
        log(f"wrote {args.json}")
    if args.chart:
        sys.path.insert(0, str(BENCH))
        try:
            import chart

            chart.draw(doc, Path(args.chart))
            log(f"wrote {args.chart}")
        except ImportError:
            log("no chart: matplotlib is not installed (apt-get install python3-matplotlib)")

    no_answer = [p for p, r in results.items()
                 if r.get("smoke") != "ok"
                 or (isinstance(_v(r, "conns", "concurrent_answered"), int)
                     and r["conns"]["concurrent_answered"] < r["conns"]["concurrent_target"])
                 or _err(r, "conns")]
    if errs or failed or args.keep:
        log(f"logs kept in {b.work}")
    else:
        shutil.rmtree(b.work, ignore_errors=True)
    if failed:
        return 1
    if args.quick and no_answer:
        log(f"pairs that failed to answer: {', '.join(no_answer)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
