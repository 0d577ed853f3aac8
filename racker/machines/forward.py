"""A nat machine's published ports, forwarded in userspace (as docker-proxy does).

    python -m racker.machines.forward LEADER LEADER_START FD=GUEST_ADDRESS:GUEST_PORT ...

Each FD is a listening TCP socket that racker bound (so that a port in use
was racker's one clear error, before anything booted) and handed over. A
connection accepted on it is joined to the guest's port. The forwarder lives
exactly as long as the machine: it exits when the machine's leader does.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import socket
import sys

from racker import proc


async def _copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()  # a half-close passes through: HTTP/1.0 clients rely on it
    except (ConnectionError, OSError):
        writer.close()


async def _join(address: str, port: int, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
    try:
        guest_reader, guest_writer = await asyncio.open_connection(address, port)
    except OSError:
        client_writer.close()  # the guest does not listen: the client sees the connection close
        return
    try:
        await asyncio.gather(_copy(client_reader, guest_writer), _copy(guest_reader, client_writer))
    finally:
        for writer in (client_writer, guest_writer):
            writer.close()


async def serve(leader: int, leader_start: int, forwards: list[tuple[int, str, int]]) -> None:
    try:
        pidfd = os.pidfd_open(leader)
    except ProcessLookupError:
        return
    if proc.start_time(leader) != leader_start:
        return  # the machine is gone already, and its pid taken by another process
    loop = asyncio.get_running_loop()
    machine_gone = loop.create_future()
    loop.add_reader(pidfd, lambda: machine_gone.done() or machine_gone.set_result(None))
    servers = []
    for fd, address, port in forwards:
        listener = socket.socket(fileno=fd)
        servers.append(await asyncio.start_server(functools.partial(_join, address, port), sock=listener))
    await machine_gone
    for server in servers:
        server.close()


def parse(argv: list[str]) -> tuple[int, int, list[tuple[int, str, int]]]:
    leader, leader_start, *specs = argv
    forwards = []
    for spec in specs:
        fd, _, target = spec.partition("=")
        address, _, port = target.rpartition(":")
        forwards.append((int(fd), address, int(port)))
    return int(leader), int(leader_start), forwards


def main(argv: list[str]) -> int:
    leader, leader_start, forwards = parse(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(leader, leader_start, forwards))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
