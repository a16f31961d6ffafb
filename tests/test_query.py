"""proxymap-query against a live proxymap server (in-process asyncio server on a thread).

The server side is the real stack: ProxymapProtocol + RequestHandler + texthash /
internal tables; what goes over the wire is recorded, so the client's bytes are
checked against what Postfix clients send (docs/PROTOCOL.md 6.1, 6.5). The same CLI is run
against the real worker process in test_server_worker.py.
"""

from __future__ import annotations

import asyncio
import os
import threading

import pytest
from click.testing import CliRunner

from proxymap import attr
from proxymap.connection import ProxymapProtocol
from proxymap.handler import RequestHandler
from proxymap.protocol import stream_name
from proxymap.query import main
from tests.test_connection import RecordingServer


class LiveServer:
    """A proxymap service on a UNIX socket, served by a loop in a thread."""

    def __init__(self, path: str, service: str, approved, params=None):
        self.path = path
        self.handler = RequestHandler(service, approved, params or {})
        self.stream = stream_name(service)
        self.received: list[bytes] = []
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _factory(self):
        protocol = ProxymapProtocol(RecordingServer(), self.handler, self.stream)
        feed = protocol.data_received

        def recording(data: bytes) -> None:
            if self.received is not None:
                self.received.append(data)
            feed(data)

        protocol.data_received = recording
        return protocol

    def _run(self):
        asyncio.set_event_loop(self.loop)
        server = self.loop.run_until_complete(
            self.loop.create_unix_server(self._factory, self.path)
        )
        self.ready.set()
        self.loop.run_forever()
        server.close()
        self.loop.run_until_complete(server.wait_closed())

    def requests(self) -> list:
        return attr.AttrDecoder().feed(b"".join(self.received))

    def __enter__(self):
        self.thread.start()
        self.ready.wait(5)
        return self

    def __exit__(self, *exc):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture
def tables(tmp_path):
    path = tmp_path / "map"
    path.write_text("alice alice@example.com\nbob bob@example.com\nstra\u00dfe street\n")
    return f"texthash:{path}"


def query(*args):
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return (
        result.exit_code,
        result.stdout_bytes if hasattr(result, "stdout_bytes") else result.stdout,
        result.stderr,
    )


def test_lookup_like_37_postmap(tmp_path, tables):
    with LiveServer(str(tmp_path / "s"), "proxymap", {tables}) as live:
        status, out, _ = query("-s", live.path, "alice", f"proxy:{tables}")
        assert (status, out) == (0, b"alice@example.com\n")
        assert live.requests() == [
            [(b"request", b"open"), (b"table", tables.encode()), (b"flags", b"0")],
            [
                (b"request", b"lookup"),
                (b"table", tables.encode()),
                (b"flags", b"524353"),
                (b"key", b"alice"),
            ],
        ]


def test_client_side_casefold_and_not_found(tmp_path, tables):
    with LiveServer(str(tmp_path / "s"), "proxymap", {tables}) as live:
        assert query("-s", live.path, "ALICE", f"proxy:{tables}")[:2] == (0, b"alice@example.com\n")
        assert query("-s", live.path, "STRASSE", f"proxy:{tables}")[:2] == (
            0,
            b"street\n",
        )  # full casefold
        assert query("-s", live.path, "nobody", f"proxy:{tables}")[:2] == (1, b"")
        assert live.requests()[1][3] == (b"key", b"alice")


def test_v311_like_312_postmap(tmp_path, tables):
    with LiveServer(str(tmp_path / "s"), "proxymap", {tables}) as live:
        status, out, _ = query("-s", live.path, "--v311", "ALICE", f"proxy:{tables}")
        assert (status, out) == (0, b"alice@example.com\n")
        opened, looked_up = live.requests()
        assert opened == [
            (b"request", b"open"),
            (b"table", tables.encode()),
            (b"instance_flags", b"540737"),
        ]
        assert looked_up[1:3] == opened[1:3] and looked_up[4] == (b"key", b"ALICE")
        # The server installed its UTF-8 layer; the client sends the word it was given.
        assert int(looked_up[3][1]) & 0x100000


def test_sequence_listing(tmp_path, tables):
    with LiveServer(str(tmp_path / "s"), "proxymap", {tables}) as live:
        for v311 in ([], ["--v311"]):
            status, out, _ = query("-s", live.path, *v311, "--sequence", f"proxy:{tables}")
            assert status == 0
            assert sorted(out.splitlines()) == [
                b"alice\talice@example.com",
                b"bob\tbob@example.com",
                b"strasse\tstreet",
            ]  # folded at load


def test_denied_and_bad_exit_codes(tmp_path, tables):
    with LiveServer(str(tmp_path / "s"), "proxymap", {tables}) as live:
        status, _, err = query("-s", live.path, "alice", "proxy:texthash:/not/approved")
        assert (
            status == 4
            and 'proxymap service is not configured for table "texthash:/not/approved"' in err
        )
        status, _, err = query("-s", live.path, "--v311", "alice", "proxy:texthash:/not/approved")
        assert status == 4
        status, _, err = query("-s", live.path, "--update", "k", "v", f"proxy:{tables}")
        assert status == 4 and "update access is not configured" in err
        assert query("-s", live.path, "alice", "proxy:nocolon")[0] == 3


def test_retry_exit_code_for_unavailable_table(tmp_path):
    missing = f"texthash:{tmp_path / 'missing'}"
    with LiveServer(str(tmp_path / "s"), "proxymap", {missing}) as live:
        status, _, err = query("-s", live.path, "alice", f"proxy:{missing}")
        assert status == 2 and "temporary failure" in err


def test_update_and_delete_through_proxywrite(tmp_path):
    table = "internal:w"
    with LiveServer(str(tmp_path / "s"), "proxywrite", {table}) as live:
        assert query("-s", live.path, "--update", "K1", "v1", f"proxy:{table}")[0] == 0
        assert query("-s", live.path, "--write", "k1", f"proxy:{table}")[:2] == (0, b"v1\n")
        assert query("-s", live.path, "--delete", "k1", f"proxy:{table}")[0] == 0
        assert query("-s", live.path, "--delete", "k1", f"proxy:{table}")[0] == 1
        g1_update = live.requests()[1]
        assert g1_update == [
            (b"request", b"update"),
            (b"table", b"internal:w"),
            (b"flags", b"524289"),
            (b"key", b"k1"),
            (b"value", b"v1"),
        ]
        # 3.11+: postmap -i and postmap -q/-d use different instance_flags, hence different
        # table instances (docs/PROTOCOL.md 6.5); the update is seen only by its own instance.
        assert query("-s", live.path, "--v311", "--update", "K2", "v2", f"proxy:{table}")[0] == 0
        assert query("-s", live.path, "--v311", "--delete", "k2", f"proxy:{table}")[0] == 1
        g2_update = live.requests()[-3]
        assert g2_update[2] == (b"instance_flags", b"540673") and g2_update[4] == (b"key", b"K2")


def test_connection_failure_is_75(tmp_path):
    status, _, err = query("-s", str(tmp_path / "nothing"), "alice", "proxy:hash:/x")
    assert status == 75 and "connect to" in err


def test_default_socket_from_main_cf(tmp_path, tables):
    conf = tmp_path / "conf"
    conf.mkdir()
    (tmp_path / "private").mkdir()
    (conf / "main.cf").write_text(f"queue_directory = {tmp_path}\n")
    with LiveServer(str(tmp_path / "private" / "proxymap"), "proxymap", {tables}):
        assert query("-c", str(conf), "bob", f"proxy:{tables}")[:2] == (0, b"bob@example.com\n")


def test_unreadable_config_is_5(tmp_path):
    status, _, err = query("-c", str(tmp_path / "none"), "bob", "proxy:hash:/x")
    assert status == 5 and "configuration" in err


def test_usage_errors():
    assert query("only-one-arg")[0] == 2  # click usage error
    assert query("--sequence", "--delete", "k", "proxy:hash:/x")[0] == 2


def test_non_utf8_key_is_not_found(tmp_path, tables):
    with LiveServer(str(tmp_path / "s"), "proxymap", {tables}) as live:
        key = os.fsdecode(b"\xff")
        status, _, err = query("-s", live.path, key, f"proxy:{tables}")
        assert status == 1 and "non-UTF-8 key" in err
