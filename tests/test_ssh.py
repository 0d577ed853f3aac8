"""The in-process sshd probe a booting VM is polled with, against real sockets on loopback."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from racker.vm import ssh


@contextmanager
def server(greeting: bytes | None) -> Iterator[int]:
    """A loopback port that sends `greeting` to each connection and closes it (None: close at once)."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.1)  # so that the thread sees `done` soon
    done = threading.Event()

    def serve() -> None:
        while not done.is_set():
            try:
                connection, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with connection:
                if greeting is not None:
                    connection.sendall(greeting)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        done.set()
        listener.close()
        thread.join(5)


def endpoint(port: int) -> ssh.Endpoint:
    return ssh.Endpoint("127.0.0.1", port, "racker", Path("/nonexistent"))


def test_a_greeting_sshd_answers() -> None:
    with server(b"SSH-2.0-OpenSSH_10.0\r\n") as port:
        assert endpoint(port).answers()


def test_a_port_that_accepts_and_closes_does_not_answer() -> None:
    # What QEMU's user networking does while nothing listens in the guest.
    with server(None) as port:
        assert not endpoint(port).answers()


def test_another_service_does_not_answer() -> None:
    with server(b"HTTP/1.1 400 Bad Request\r\n") as port:
        assert not endpoint(port).answers()


def test_a_closed_port_does_not_answer() -> None:
    with server(None) as port:
        pass  # closed again: nothing listens on it now
    assert not endpoint(port).answers(timeout=1)
