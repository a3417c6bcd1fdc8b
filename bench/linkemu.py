#!/usr/bin/env python3
"""User-space link emulator for the amb benchmark: a delaying TCP and UDP relay on loopback.

    python3 bench/linkemu.py --delay-ms 10 [--tcp LISTEN:TARGET]... [--udp LISTEN:TARGET]...

Each --tcp/--udp relays 127.0.0.1:LISTEN to 127.0.0.1:TARGET (LISTEN 0 = pick one) and adds
--delay-ms to every byte or datagram in each direction, so a round trip across it costs
2 x delay. Once bound it prints one JSON line {"tcp": [ports], "udp": [ports]} on stdout.

TCP: the relay terminates TCP on both sides, so it models the handshake itself: a connection
accepted at t0 reaches the target at t0 + 3*delay (SYN, SYN-ACK, ACK), and bytes the app sends
before its emulated SYN-ACK (t0 + 2*delay) are held until then. A fresh connection's first
request therefore costs 2 round trips, as across a real link. Packet loss cannot be emulated
by a stream relay; the harness uses iptables on the relay's port for that.

UDP: one upstream socket per client address (a tiny NAT); each datagram is delayed, and
dropped with probability `loss` in each direction.

Control on stdin, one command per line: `loss P` sets the UDP drop probability (answers
`ok loss P udp_dropped N udp_passed M`, counts since start). The relay exits when stdin closes or on SIGTERM/SIGINT.
"""

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import sys

HOST = "127.0.0.1"
CHUNK = 64 * 1024


class Link:
    def __init__(self, delay: float, loss: float):
        self.delay = delay
        self.loss = loss
        self.dropped = 0
        self.passed = 0

    def drop(self) -> bool:
        if self.loss and random.random() < self.loss:
            self.dropped += 1
            return True
        self.passed += 1
        return False


async def _pump(reader, queue, loop, deliver_at):
    """Reads chunks and queues (deliver_time, data); None marks EOF, an exception an abort."""
    try:
        while True:
            data = await reader.read(CHUNK)
            await queue.put((deliver_at(loop.time()), data or None))
            if not data:
                return
    except Exception as e:  # reset by peer and the like
        await queue.put((0.0, e))


async def _writer(queue, writer, loop, ready=None):
    if ready is not None:
        await ready
    while True:
        when, data = await queue.get()
        if isinstance(data, Exception):
            raise data
        wait = when - loop.time()
        if wait > 0:
            await asyncio.sleep(wait)
        if data is None:
            if writer.can_write_eof():
                writer.write_eof()
            return
        writer.write(data)
        await writer.drain()


def _abort(writer):
    try:
        transport = writer.transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        transport.abort()
    except Exception:
        pass


async def tcp_relay(link: Link, listen: int, target: int):
    loop = asyncio.get_running_loop()

    async def handle(c_reader, c_writer):
        t0 = loop.time()
        d = link.delay
        c_sock = c_writer.get_extra_info("socket")
        if c_sock is not None:
            c_sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        up_q: asyncio.Queue = asyncio.Queue()
        down_q: asyncio.Queue = asyncio.Queue()
        # The app may send from its local connect; across a real link it could send only once
        # the SYN-ACK is back (t0 + 2d), and its bytes arrive one more delay later.
        up_pump = asyncio.create_task(_pump(c_reader, up_q, loop, lambda now: max(now, t0 + 2 * d) + d))
        u_writer = None
        tasks = [up_pump]
        try:
            await asyncio.sleep(max(0.0, t0 + 3 * d - loop.time()))
            u_reader, u_writer = await asyncio.wait_for(asyncio.open_connection(HOST, target), 10)
            u_writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            down_pump = asyncio.create_task(_pump(u_reader, down_q, loop, lambda now: now + d))
            tasks += [down_pump]
            w_up = asyncio.create_task(_writer(up_q, u_writer, loop))
            w_down = asyncio.create_task(_writer(down_q, c_writer, loop))
            tasks += [w_up, w_down]
            await asyncio.gather(w_up, w_down)
            c_writer.close()
            u_writer.close()
        except Exception:
            _abort(c_writer)
            if u_writer is not None:
                _abort(u_writer)
        finally:
            for t in tasks:
                t.cancel()

    server = await asyncio.start_server(handle, HOST, listen, backlog=4096, reuse_address=True)
    return server, server.sockets[0].getsockname()[1]


class _UdpSide(asyncio.DatagramProtocol):
    def __init__(self, on_datagram):
        self.on_datagram = on_datagram
        self.transport = None

    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, addr):
        self.on_datagram(data, addr)

    def error_received(self, exc):
        pass


async def udp_relay(link: Link, listen: int, target: int):
    loop = asyncio.get_running_loop()
    flows = {}  # client address -> upstream transport

    def send_later(transport, data, addr=None):
        def send():
            if not transport.is_closing():
                transport.sendto(data, addr) if addr else transport.sendto(data)
        loop.call_later(link.delay, send)

    front_proto = _UdpSide(None)

    def from_client(data, addr):
        if link.drop():
            return
        up = flows.get(addr)
        if up is None:
            up = flows[addr] = asyncio.ensure_future(open_flow(addr))
        if isinstance(up, asyncio.Future):
            up.add_done_callback(lambda f: send_later(f.result(), data) if not f.exception() else None)
        else:
            send_later(up, data)

    async def open_flow(addr):
        def from_target(data, _):
            if link.drop():
                return
            send_later(front_proto.transport, data, addr)

        transport, _ = await loop.create_datagram_endpoint(
            lambda: _UdpSide(from_target), remote_addr=(HOST, target)
        )
        _tune(transport)
        flows[addr] = transport
        return transport

    front_proto.on_datagram = from_client
    transport, _ = await loop.create_datagram_endpoint(lambda: front_proto, local_addr=(HOST, listen))
    _tune(transport)
    return transport, transport.get_extra_info("sockname")[1]


def _tune(transport):
    sock = transport.get_extra_info("socket")
    for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, 4 << 20)
        except OSError:
            pass


def _pair(spec: str):
    a, b = spec.split(":")
    return int(a), int(b)


async def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--delay-ms", type=float, default=10.0, help="one-way delay (default 10)")
    ap.add_argument("--loss", type=float, default=0.0, help="UDP drop probability each way")
    ap.add_argument("--tcp", action="append", default=[], type=_pair, metavar="LISTEN:TARGET")
    ap.add_argument("--udp", action="append", default=[], type=_pair, metavar="LISTEN:TARGET")
    args = ap.parse_args()
    try:  # a link should not be late because a compiler is busy: raise priority when allowed
        os.nice(-10)
    except OSError:
        pass
    link = Link(args.delay_ms / 1000.0, args.loss)
    loop = asyncio.get_running_loop()

    def quiet(loop, ctx):  # cancelled relays at shutdown and peer resets are expected
        if isinstance(ctx.get("exception"), (asyncio.CancelledError, ConnectionError)):
            return
        loop.default_exception_handler(ctx)
    loop.set_exception_handler(quiet)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    ports = {"tcp": [], "udp": []}
    keep = []
    for listen, target in args.tcp:
        server, port = await tcp_relay(link, listen, target)
        keep.append(server)
        ports["tcp"].append(port)
    for listen, target in args.udp:
        transport, port = await udp_relay(link, listen, target)
        keep.append(transport)
        ports["udp"].append(port)
    print(json.dumps(ports), flush=True)

    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    async def control():
        while True:
            line = await reader.readline()
            if not line:
                stop.set()
                return
            parts = line.decode().split()
            if len(parts) == 2 and parts[0] == "loss":
                link.loss = float(parts[1])
                print(f"ok loss {link.loss} udp_dropped {link.dropped} udp_passed {link.passed}", flush=True)
            else:
                print(f"error unknown command {line.decode().strip()!r}", flush=True)

    ctl = asyncio.create_task(control())
    await stop.wait()
    ctl.cancel()
    for k in keep:
        k.close()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
