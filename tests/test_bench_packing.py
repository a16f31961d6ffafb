"""The packing harness's count of clients per worker (tests/bench/packing.py)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from tests.bench.packing import clients_of, connected_inodes


def test_clients_are_the_accepted_sockets_of_the_proxymap_socket(tmp_path: Path) -> None:
    """Only the server side of a connection to private/proxymap counts: not the
    listener, not the clients' ends, not a connection to another socket."""
    private = tmp_path / "private"
    private.mkdir()
    path = private / "proxymap"
    other_path = tmp_path / "other"
    with (
        socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener,
        socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as other,
    ):
        listener.bind(str(path))
        listener.listen()
        other.bind(str(other_path))
        other.listen()
        clients = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(4)]
        for client in clients[:3]:
            client.connect(str(path))
        clients[3].connect(str(other_path))
        accepted = [listener.accept()[0] for _ in range(3)] + [other.accept()[0]]
        try:
            assert clients_of(os.getpid(), connected_inodes(path)) == 3
            accepted[0].close()
            assert clients_of(os.getpid(), connected_inodes(path)) == 2
        finally:
            for sock in clients + accepted:
                sock.close()
