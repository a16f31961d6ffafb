"""One atheris process: instrument the worker's code, then fuzz one target.

NAME
    child -- ``python -m tests.fuzz.child TARGET WORKDIR [libFuzzer options...]``

DESCRIPTION
    Started by ``tests.fuzz.run`` (which cleans WORKDIR up and keeps crash inputs).
    The ``proxymap`` and ``master`` packages are imported under
    ``atheris.instrument_imports``, so libFuzzer sees the branches of the decoder,
    scanner, connection, handler and table drivers (the lazily imported table
    modules are imported here, inside the instrumented block); the harness and the
    standard library are not instrumented. WORKDIR receives the seed corpus
    (``corpus/``), the dictionary (``dict``), crash inputs (``crash-*``) and, for the
    connection target, the table files and the socketmap socket.
"""

from __future__ import annotations

import importlib
import logging
import sys
from pathlib import Path

import atheris

TABLE_MODULES = (
    "texthash",
    "inline",
    "static",
    "fail",
    "bdb",
    "lmdb",
    "cdb",
    "regexp",
    "pcre",
    "cidr",
    "unionmap",
    "pipemap",
    "composite",
    "socketmap",
    "pool",
    "streams",
    "utf8",
    "indexed",
    "base",
)


def _instrumented() -> None:
    with atheris.instrument_imports(include=["proxymap", "master"]):
        for name in (
            "proxymap.attr",
            "proxymap.protocol",
            "proxymap.connection",
            "proxymap.handler",
            "master.multi_server",
        ):
            importlib.import_module(name)
        for name in TABLE_MODULES:
            importlib.import_module(f"proxymap.tables.{name}")


def main(argv: list[str]) -> None:
    target, workdir, options = argv[1], Path(argv[2]), argv[3:]
    # Warnings about malformed input are the expected case; printing a million of
    # them would be most of the run time. Errors still reach stderr.
    logging.getLogger("proxymap").setLevel(logging.ERROR)
    _instrumented()
    from tests.fuzz import seeds, targets

    tables: tuple[str, ...] = ()
    if target == "attr":
        one_input, corpus = targets.attr_one, seeds.attr_seeds()
    elif target == "scanner":
        one_input, corpus = targets.scanner_one, seeds.scanner_seeds()
    elif target == "connection":
        from tests.fuzz import world as W

        fuzz_world = W.World(workdir / "world")
        one_input = fuzz_world.one_input
        extra = fuzz_world.extra_tables
        tables = (*W.READ_TABLES, *W.WRITE_TABLES, *extra)
        corpus = seeds.connection_seeds((*W.READ_TABLES, *extra), W.WRITE_TABLES)
    else:
        raise SystemExit(f"unknown target {target!r}: attr, scanner or connection")
    corpus_dir = workdir / "corpus"
    corpus_dir.mkdir(parents=True, exist_ok=True)
    for index, seed in enumerate(corpus):
        (corpus_dir / f"seed-{index:04d}").write_bytes(seed)
    dictionary = workdir / "dict"
    dictionary.write_text("\n".join(seeds.dictionary_lines(tables)) + "\n")
    defaults = [
        f"-dict={dictionary}",
        f"-artifact_prefix={workdir}/",
        "-max_len=3000",
        "-timeout=30",
        "-rss_limit_mb=3072",
        "-print_final_stats=1",
    ]
    atheris.Setup([argv[0], *defaults, *options, str(corpus_dir)], one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
