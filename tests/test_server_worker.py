"""The proxymap service: its hooks, -S mode, and the real worker process.

Hook tests drive ``ProxymapService`` with a real ``MainConfig`` and a small recorder
for the skeleton calls (service name, exit). Worker tests start the ``proxymap``
program itself: under ``-S`` (also compared byte for byte with the installed Postfix
3.7 proxymap), and under the stand-in master of tests/support/standin_master.py
(fds 3-6, GENERATION, status messages).
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from master.mainconf import MainConfig
from proxymap import attr
from proxymap.protocol import ANNOUNCEMENT
from proxymap.server import (
    ProxymapService,
    ServiceNameError,
    parse_service_name,
    sorted_bytewise,
)
from proxymap.tables import TABLE_TYPES
from tests.support.postfix import ensure_postfix, postmap_path
from tests.test_connection import SlowTable  # noqa: F401 - registered by name below

REPOSITORY = Path(__file__).resolve().parents[1]
ALICE_REPLY = b"status\x000\x00value\x00alice@example.com\x00\x00"


class Exited(Exception):
    pass


class RecordingServer:
    """The attributes of master.multi_server.MultiServer that the service uses."""

    def __init__(self, service_name: str, config: MainConfig):
        self.service_name = service_name
        self.config = config
        self.exits: list[int] = []
        self.exit_callbacks: list = []

    def exit(self, status: int) -> None:
        self.exits.append(status)
        raise Exited(status)

    def on_exit(self, callback) -> None:
        self.exit_callbacks.append(callback)

    def request_started(self):
        pass

    def request_done(self):
        pass


def config(tmp_path: Path, text: str) -> MainConfig:
    conf = tmp_path / "conf"
    conf.mkdir(exist_ok=True)
    (conf / "main.cf").write_text(text)
    return MainConfig.load(str(conf))


# --- service name and export mode -------------------------------------------------------------


def test_service_names():
    assert parse_service_name("proxymap") == ("proxymap", None)
    assert parse_service_name("proxywrite") == ("proxywrite", None)
    assert parse_service_name("export-proxy-proxymap") == ("proxymap", False)
    assert parse_service_name("export-all-proxywrite") == ("proxywrite", True)
    for bad in ("pyproxymap", "Proxymap", "export-proxy-", "export-all-foo"):
        with pytest.raises(ServiceNameError):
            parse_service_name(bad)


def test_bad_service_name_is_fatal_with_the_39_message(tmp_path, caplog):
    server = RecordingServer("pyproxymap", config(tmp_path, ""))
    with caplog.at_level(logging.CRITICAL, "proxymap"), pytest.raises(SystemExit) as exited:
        ProxymapService().pre_init(server)
    assert exited.value.code == 1
    assert caplog.messages == [
        'invalid service name: "pyproxymap" - service name must be "proxywrite" or "proxymap"'
    ]


def test_export_mode_prints_sorted_bytewise(tmp_path, capsys):
    cfg = config(
        tmp_path, "proxy_read_maps = proxy:texthash:/b, proxy:texthash:/a hash:/c proxy:Z:x\n"
    )
    for name, expected in (
        ("export-proxy-proxymap", ["Z:x", "texthash:/a", "texthash:/b"]),
        ("export-all-proxymap", ["Z:x", "hash:/c", "texthash:/a", "texthash:/b"]),
    ):
        server = RecordingServer(name, cfg)
        with pytest.raises((Exited, SystemExit)):
            ProxymapService().pre_init(server)
        assert server.exits == [0]
        assert capsys.readouterr().out.splitlines() == expected
    assert sorted_bytewise(["b", "\u00e9", "B", "a"]) == ["B", "a", "b", "\u00e9"]


# --- changed table (pre-accept) ---------------------------------------------------------------


def postmap(*args: str) -> None:
    ensure_postfix()  # installs Postfix when root, else skips
    subprocess.run([postmap_path(), *args], check=True)


def test_changed_hash_table_restarts_the_reader(tmp_path, caplog):
    source = tmp_path / "map"
    source.write_text("alice alice@example.com\n")
    postmap(f"hash:{source}")
    table = f"hash:{source}"
    cfg = config(tmp_path, f"proxy_read_maps = proxy:{table}\n")
    service = ProxymapService()
    server = RecordingServer("proxymap", cfg)
    service.pre_init(server)
    service.post_init(server)
    reply = service.handler.handle(parse(lookup(table, b"alice")))
    assert reply.value == b"alice@example.com"
    service.pre_accept(server)  # unchanged: nothing happens
    assert server.exits == []
    time.sleep(0.01)
    source.write_text("alice changed@example.com\n")
    postmap(f"hash:{source}")
    with caplog.at_level(logging.INFO, "proxymap"), pytest.raises(Exited):
        service.pre_accept(server)
    assert server.exits == [0]
    assert f"table {table}: has changed -- restarting" in caplog.messages


def test_writer_never_restarts_on_change(tmp_path):
    source = tmp_path / "map"
    source.write_text("a b\n")
    postmap(f"hash:{source}")
    table = f"hash:{source}"
    service = ProxymapService()
    server = RecordingServer("proxywrite", config(tmp_path, f"proxy_write_maps = proxy:{table}\n"))
    os_setsid = os.setsid
    try:
        os.setsid = lambda: None  # keep the test runner's session
        service.pre_init(server)
    finally:
        os.setsid = os_setsid
    service.post_init(server)
    service.handler.handle(parse(lookup(table, b"a")))
    postmap(f"hash:{source}")
    service.pre_accept(server)
    assert server.exits == []


# --- -S mode, in process ------------------------------------------------------------------------


def lookup(table: str, key: bytes, flags: bytes = b"64") -> bytes:
    return attr.encode(
        [(b"request", b"lookup"), (b"table", table.encode()), (b"flags", flags), (b"key", key)]
    )


def parse(wire: bytes):
    from proxymap.protocol import parse_request

    return parse_request(attr.AttrDecoder().feed(wire)[0], "test")


@pytest.fixture
def texthash(tmp_path):
    path = tmp_path / "map"
    path.write_text("alice alice@example.com\n")
    return f"texthash:{path}"


def standalone(tmp_path, table: str, data: bytes, service_name: str = "proxymap") -> bytes:
    cfg = config(tmp_path, f"proxy_read_maps = proxy:{table}\nproxy_write_maps = proxy:{table}\n")
    service = ProxymapService()
    server = RecordingServer(service_name, cfg)
    service.pre_init(server)
    service.post_init(server)
    out = io.BytesIO()
    service.serve_standalone(server, io.BytesIO(data), out)
    return out.getvalue()


def test_standalone_lookup_and_g2(tmp_path, texthash):
    assert standalone(tmp_path, texthash, lookup(texthash, b"alice")) == ALICE_REPLY
    g2 = b"request\x00open\x00table\x00" + texthash.encode() + b"\x00instance_flags\x000\x00\x00"
    assert standalone(tmp_path, texthash, g2) == b"status\x000\x00flags\x0016\x00\x00"


def test_standalone_reads_only_one_request(tmp_path, texthash):
    assert (
        standalone(tmp_path, texthash, lookup(texthash, b"alice") + lookup(texthash, b"bob"))
        == ALICE_REPLY
    )


def test_standalone_eof_cases(tmp_path, texthash):
    assert standalone(tmp_path, texthash, b"") == b""
    assert (
        standalone(tmp_path, texthash, b"request\x00lookup\x00table")
        == b"status\x003\x00value\x00\x00\x00"
    )
    assert standalone(tmp_path, texthash, b"\x00") == b""
    assert standalone(tmp_path, texthash, b"req") == b""  # a name cut short: no reply


def test_standalone_awaits_a_slow_table(tmp_path, monkeypatch):
    monkeypatch.setitem(TABLE_TYPES, "slow", "tests.test_connection:SlowTable")
    assert (
        standalone(tmp_path, "slow:0.1", lookup("slow:0.1", b"x"))
        == b"status\x000\x00value\x00slow:x\x00\x00"
    )
    with pytest.raises(RuntimeError):
        asyncio.get_running_loop()  # the private loop did not leak


# --- the real program ---------------------------------------------------------------------------


def proxymap_command() -> list[str]:
    script = Path(sys.executable).with_name("proxymap")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "from proxymap.server import main; main()"]


def worker_env(conf: Path) -> dict[str, str]:
    env = dict(os.environ, MAIL_CONFIG=str(conf))
    env["PYTHONPATH"] = str(REPOSITORY)
    return env


def test_program_standalone_mode(tmp_path, texthash):
    cfg_dir = tmp_path / "conf"
    cfg_dir.mkdir()
    (cfg_dir / "main.cf").write_text(
        f"proxy_read_maps = proxy:{texthash}\nmaillog_file = /dev/stderr\n"
    )
    done = subprocess.run(
        proxymap_command() + ["-S"],
        input=lookup(texthash, b"alice"),
        capture_output=True,
        env=worker_env(cfg_dir),
        timeout=30,
    )
    assert (done.returncode, done.stdout) == (0, ALICE_REPLY), done.stderr
    done = subprocess.run(
        proxymap_command() + ["-S", "-n", "export-proxy-proxymap"],
        input=b"",
        capture_output=True,
        env=worker_env(cfg_dir),
        timeout=30,
    )
    assert (done.returncode, done.stdout) == (0, texthash.encode() + b"\n"), done.stderr
    done = subprocess.run(
        proxymap_command() + ["-V", "-S", "-n", "nonsense"],
        input=b"",
        capture_output=True,
        env=worker_env(cfg_dir),
        timeout=30,
    )
    assert done.returncode == 1 and b'invalid service name: "nonsense"' in done.stderr + done.stdout
    done = subprocess.run(
        proxymap_command() + ["-V", "-S", "extra"],
        input=b"",
        capture_output=True,
        env=worker_env(cfg_dir),
        timeout=30,
    )
    assert done.returncode == 1 and b"unexpected command-line argument: extra" in done.stderr


# --- differential: -S against the installed Postfix 3.7 proxymap --------------------------------

C_PROXYMAP = Path("/usr/lib/postfix/sbin/proxymap")

DIFFERENTIAL_INPUTS = [
    lookup("@T@", b"alice"),
    lookup("@T@", b"ALICE", flags=b"16448"),
    lookup("@T@", b"nobody"),
    lookup("proxy:proxy:@T@", b"alice"),
    lookup("foo", b"alice"),
    lookup("texthash:/nope", b"alice"),
    attr.encode([(b"request", b"open"), (b"table", b"@T@"), (b"flags", b"0")]),
    attr.encode([(b"request", b"open"), (b"table", b"nocolon"), (b"flags", b"0")]),
    attr.encode(
        [
            (b"request", b"update"),
            (b"table", b"@T@"),
            (b"flags", b"0"),
            (b"key", b"k"),
            (b"value", b"v"),
        ]
    ),
    attr.encode([(b"request", b"delete"), (b"table", b"@T@"), (b"flags", b"0"), (b"key", b"k")]),
    b"request\x00bogus\x00table\x00@T@\x00\x00",
    attr.encode(
        [(b"request", b"sequence"), (b"table", b"@T@"), (b"flags", b"64"), (b"function", b"2")]
    ),
    attr.encode([(b"request", b"lookup"), (b"table", b"@T@"), (b"flags", b"64")]),
    lookup("@T@", b"alice")[:-1] + b"extra\x00x\x00\x00",
    attr.encode(
        [(b"request", b"lookup"), (b"flags", b"64"), (b"table", b"@T@"), (b"key", b"alice")]
    ),
    attr.encode(
        [
            (b"request", b"lookup"),
            (b"table", b"@T@"),
            (b"flags", b"64"),
            (b"key", b"alice"),
            (b"key", b"bob"),
        ]
    ),
    *[
        lookup("@T@", b"alice", flags=text)
        for text in (
            b" 64",
            b"+64",
            b"\t64",
            b"00064",
            b"4294967360",
            b"0100",
            b"0x40",
            b"",
            b"64abc",
            b"64 ",
        )
    ],
    b"\x00",
    b"table\x00@T@\x00flags\x0064\x00\x00",
    b"request\x00lookup\x00table",
    b"request\x00lookup\x00",
    b"request\x00lookup\x00table\x00@T@\x00flags\x0064\x00key\x00alice\x00",
    b"",
    lookup("@T@", b"k" * 200000),
]


@pytest.fixture(scope="module")
def c_setup(tmp_path_factory):
    """One tree for the C proxymap: table, queue directory, main.cf."""
    ensure_postfix()
    root = tmp_path_factory.mktemp("c37")
    source = root / "map"
    source.write_text("alice alice@example.com\nbob bob@example.com\n")
    table = f"texthash:{source}"
    conf = root / "conf"
    conf.mkdir()
    (root / "queue").mkdir()
    main_cf = conf / "main.cf"
    # maillog_file: log through the (absent) postlog socket instead of waiting for syslog.
    main_cf.write_text(
        f"queue_directory = {root / 'queue'}\nproxy_read_maps = proxy:{table}\n"
        "compatibility_level = 3.6\nmaillog_file = /dev/stdout\n"
    )
    # Postfix waits (0.3 s per try) while main.cf looks modified in the last seconds.
    past = time.time() - 60
    os.utime(main_cf, (past, past))
    return table, conf


@pytest.mark.parametrize("template", DIFFERENTIAL_INPUTS, ids=range(len(DIFFERENTIAL_INPUTS)))
def test_standalone_same_bytes_as_postfix_37(tmp_path, template, c_setup):
    table, conf = c_setup
    data = template.replace(b"@T@", table.encode())
    real = subprocess.run(
        [str(C_PROXYMAP), "-S"],
        input=data,
        capture_output=True,
        timeout=30,
        env={"MAIL_CONFIG": str(conf), "PATH": "/usr/bin:/bin"},
    )
    assert real.returncode == 0, real.stderr
    ours = standalone(tmp_path, table, data)
    assert ours == real.stdout


# --- the real worker under the stand-in master ---------------------------------------------------


def worker_tree(tmp_path: Path, maps: str, extra: str = "") -> Path:
    conf = tmp_path / "wconf"
    conf.mkdir()
    queue = tmp_path / "wqueue"
    queue.mkdir()
    # compatibility_level 3.6: smtputf8_enable = yes, as on the machines of docs/PROTOCOL.md 6.
    (conf / "main.cf").write_text(
        f"queue_directory = {queue}\nproxy_read_maps = {maps}\ncompatibility_level = 3.6\n{extra}"
    )
    return conf


def start_worker(tmp_path: Path, conf: Path, *args: str, event_loop: str = "asyncio"):
    from tests.support.standin_master import StandinMaster

    argv = [*proxymap_command(), "-t", "unix", "-V", *args]
    return StandinMaster(
        argv,
        config_dir=conf,
        socket_path=tmp_path / "proxymap.sock",
        env={"PYPROXYMAP_EVENT_LOOP": event_loop},
    )


def handshake(master) -> socket.socket:
    client = master.connect()
    assert recv_exactly(client, 28) == ANNOUNCEMENT
    return client


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            break
        data += chunk
    return data


@pytest.mark.parametrize("event_loop", ["asyncio", "uvloop"])
def test_worker_taken_avail_around_each_request(tmp_path, texthash, event_loop):
    conf = worker_tree(tmp_path, f"proxy:{texthash}")
    with start_worker(tmp_path, conf, event_loop=event_loop) as master:
        client = handshake(master)
        assert master.expect_no_status(0.3)  # nothing at accept
        for key, reply in (
            (b"alice", ALICE_REPLY),
            (b"nobody", b"status\x001\x00value\x00\x00\x00"),
        ):
            client.sendall(lookup(texthash, key))
            assert recv_exactly(client, len(reply)) == reply
            taken, avail = master.read_status(), master.read_status()
            assert (taken.pid, taken.generation, taken.avail) == (master.pid, 0o123, 0)
            assert (avail.pid, avail.avail) == (master.pid, 1)
        client.close()
        assert master.expect_no_status(0.3)  # nothing at disconnect
        master.close_status()
        assert master.wait(5) == 0


def test_worker_g2_client_and_malformed_input_on_one_connection(tmp_path, texthash):
    conf = worker_tree(tmp_path, f"proxy:{texthash}")
    with start_worker(tmp_path, conf) as master:
        client = handshake(master)
        client.sendall(
            b"request\x00open\x00table\x00"
            + texthash.encode()
            + b"\x00instance_flags\x00540737\x00\x00"
        )
        assert (
            recv_exactly(client, 24) == b"status\x000\x00flags\x001589329\x00\x00"
        )  # as 3.12 (6.5)
        client.sendall(lookup(texthash, b"alice", flags=b"-1"))  # aborts the C server
        assert recv_exactly(client, len(ALICE_REPLY)) == ALICE_REPLY
        client.sendall(b"request\x00bogus\x00\x00")
        assert recv_exactly(client, 10) == b"status\x003\x00\x00"
        master.close_status()
        assert master.wait(5) == 0
        assert b'unrecognized request: "bogus", ignored' in master.output()[1]


def test_worker_max_use_counts_connections(tmp_path, texthash):
    conf = worker_tree(tmp_path, f"proxy:{texthash}")
    with start_worker(tmp_path, conf, "-o", "max_use=2") as master:
        for _ in range(2):
            client = handshake(master)
            for _ in range(2):
                client.sendall(lookup(texthash, b"alice"))
                assert recv_exactly(client, len(ALICE_REPLY)) == ALICE_REPLY
            client.close()
        assert master.wait(5) == 0


def test_worker_max_idle(tmp_path, texthash):
    conf = worker_tree(tmp_path, f"proxy:{texthash}")
    with start_worker(tmp_path, conf, "-o", "max_idle=1") as master:
        started = time.monotonic()
        assert master.wait(10) == 0
        assert time.monotonic() - started < 5


def test_worker_exits_when_master_goes_even_with_a_client(tmp_path, texthash):
    conf = worker_tree(tmp_path, f"proxy:{texthash}")
    with start_worker(tmp_path, conf) as master:
        client = handshake(master)
        client.sendall(lookup(texthash, b"alice"))
        assert recv_exactly(client, len(ALICE_REPLY)) == ALICE_REPLY
        master.close_status()
        assert master.wait(5) == 0
        assert client.recv(10) == b""


def test_worker_restarts_when_a_hash_table_changed(tmp_path):
    source = tmp_path / "map"
    source.write_text("alice alice@example.com\n")
    postmap(f"hash:{source}")
    table = f"hash:{source}"
    conf = worker_tree(tmp_path, f"proxy:{table}")
    with start_worker(tmp_path, conf) as master:
        client = handshake(master)
        client.sendall(lookup(table, b"alice"))
        assert recv_exactly(client, len(ALICE_REPLY)) == ALICE_REPLY
        time.sleep(0.01)
        source.write_text("alice changed@example.com\n")
        postmap(f"hash:{source}")
        # The open connection is still served (the check runs before accept only).
        client.sendall(lookup(table, b"alice"))
        assert recv_exactly(client, 2)[:2] == b"st"
        waiting = master.connect()
        assert master.wait(5) == 0
        assert master.accept_pending() is not None  # left in the backlog for a successor
        waiting.close()
        assert f"table {table}: has changed -- restarting".encode() in master.output()[1]


def test_worker_serves_proxymap_query(tmp_path, texthash):
    conf = worker_tree(tmp_path, f"proxy:{texthash}")
    query_script = Path(sys.executable).with_name("proxymap-query")
    with start_worker(tmp_path, conf) as master:
        for args, expected in (
            (["alice"], (0, b"alice@example.com\n")),
            (["--v311", "ALICE"], (0, b"alice@example.com\n")),
            (["nobody"], (1, b"")),
            (["--sequence"], (0, b"alice\talice@example.com\n")),
        ):
            done = subprocess.run(
                [str(query_script), "-s", master.socket_path, *args, f"proxy:{texthash}"],
                capture_output=True,
                timeout=30,
            )
            assert (done.returncode, done.stdout) == expected, done.stderr
        done = subprocess.run(
            [str(query_script), "-s", master.socket_path, "x", "proxy:texthash:/unapproved"],
            capture_output=True,
            timeout=30,
        )
        assert done.returncode == 4
        master.close_status()
        assert master.wait(5) == 0
        assert b'request for unapproved table: "texthash:/unapproved"' in master.output()[1]


@pytest.mark.parametrize("event_loop", ["asyncio", "uvloop"])
def test_worker_request_deadline_and_half_close(tmp_path, texthash, event_loop):
    conf = worker_tree(tmp_path, f"proxy:{texthash}")
    with start_worker(tmp_path, conf, event_loop=event_loop) as master:
        stalled = handshake(master)
        stalled.sendall(lookup(texthash, b"alice")[:25])
        started = time.monotonic()
        assert stalled.recv(100) == b""  # closed by the server, no reply
        assert 0.9 <= time.monotonic() - started < 3
        half = handshake(master)
        half.sendall(b"request\x00lookup\x00table")
        half.shutdown(socket.SHUT_WR)
        assert recv_exactly(half, 100) == b"status\x003\x00value\x00\x00\x00"
        fine = handshake(master)  # the process still serves
        fine.sendall(lookup(texthash, b"alice"))
        assert recv_exactly(fine, len(ALICE_REPLY)) == ALICE_REPLY
        master.close_status()
        assert master.wait(5) == 0
        log = master.output()[1]
        assert b"timeout on proxymap socket while reading input attribute value" in log
        assert (
            b"unexpected end-of-input from proxymap socket while reading input attribute name"
            in log
        )


def test_pre_init_imports_approved_table_modules_while_root(tmp_path, monkeypatch):
    # After the privilege drop an unreadable Python installation could not import them.
    for module in ("proxymap.tables.unix", "proxymap.tables.inline"):
        monkeypatch.delitem(sys.modules, module, raising=False)
    cfg = config(
        tmp_path,
        "proxy_read_maps = proxy:unix:passwd.byname pipemap:{proxy:inline:{a=b}} proxy:nosuchtype:x\n",
    )
    ProxymapService().pre_init(RecordingServer("proxymap", cfg))
    assert "proxymap.tables.unix" in sys.modules
    assert "proxymap.tables.inline" in sys.modules


def test_worker_replays_the_37_and_312_postmap_conversations(tmp_path):
    """docs/PROTOCOL.md 6.1 (3.7 postmap -q, hash table) and 6.5 (3.12 postmap -q/-s, texthash)."""
    source = tmp_path / "testmap"
    source.write_text("alice alice@example.com\nbob bob@example.com\n")
    postmap(f"hash:{source}")
    hashed, texthash = f"hash:{source}".encode(), f"texthash:{source}".encode()
    conf = worker_tree(tmp_path, f"proxy:{hashed.decode()} proxy:{texthash.decode()}")
    conversation = [
        (
            b"request\x00open\x00table\x00" + hashed + b"\x00flags\x000\x00\x00",
            b"status\x000\x00flags\x0028\x00\x00",
        ),
        (
            b"request\x00lookup\x00table\x00"
            + hashed
            + b"\x00flags\x00524353\x00key\x00alice\x00\x00",
            b"status\x000\x00value\x00alice@example.com\x00\x00",
        ),
        (
            b"request\x00open\x00table\x00" + texthash + b"\x00instance_flags\x00540737\x00\x00",
            b"status\x000\x00flags\x001589329\x00\x00",
        ),
        (
            b"request\x00lookup\x00table\x00"
            + texthash
            + b"\x00instance_flags\x00540737\x00flags\x001589329\x00key\x00alice\x00\x00",
            b"status\x000\x00flags\x001589329\x00value\x00alice@example.com\x00\x00",
        ),
        (
            b"request\x00sequence\x00table\x00"
            + texthash
            + b"\x00instance_flags\x00540737\x00flags\x001589329\x00function\x000\x00\x00",
            None,
        ),
        (
            b"request\x00sequence\x00table\x00"
            + texthash
            + b"\x00instance_flags\x00540737\x00flags\x001589329\x00function\x001\x00\x00",
            None,
        ),
        (
            b"request\x00sequence\x00table\x00"
            + texthash
            + b"\x00instance_flags\x00540737\x00flags\x001589329\x00function\x001\x00\x00",
            b"status\x001\x00flags\x001589329\x00key\x00\x00value\x00\x00\x00",
        ),
    ]
    with start_worker(tmp_path, conf) as master:
        client = handshake(master)
        entries = set()
        for request, expected in conversation:
            client.sendall(request)
            reply = b""
            decoder = attr.AttrDecoder()
            while not decoder.feed(chunk := client.recv(4096)):
                reply += chunk
            reply += chunk
            if expected is None:  # a sequence entry; the order is the table's
                pairs = attr.AttrDecoder().feed(reply)[0]
                assert pairs[:2] == [(b"status", b"0"), (b"flags", b"1589329")]
                entries.add((pairs[2][1], pairs[3][1]))
            else:
                assert reply == expected
        assert entries == {(b"alice", b"alice@example.com"), (b"bob", b"bob@example.com")}
        master.close_status()
        assert master.wait(5) == 0
