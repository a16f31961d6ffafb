"""Constant databases: ``cdb:NAME`` kept in ``NAME.cdb`` (DJB / tinycdb format).

NAME
    cdb -- constant database reader and writer, and the cdb table (Postfix dict_cdb)

SYNOPSIS
    reader = CdbReader.open("/etc/postfix/virtual.cdb"); reader.get(b"alice")
    write_cdb("/tmp/x.cdb", [(b"alice", b"alice@example.com")])

DESCRIPTION
    File layout (all numbers little-endian 32-bit): a 2048-byte header of 256
    (position, slot count) pairs, one per hash table; the records, each
    ``key length, value length, key, value``; then the 256 hash tables, whose slots
    are (hash, record position) pairs, position 0 meaning an empty slot. The hash of
    a key starts at 5381 and folds in each byte as ``h = (h * 33) ^ byte``; the low 8
    bits choose the table, the rest (modulo the slot count) the first slot to probe.

    The table reads the file through ``mmap``. postmap writes cdb keys and values
    without a trailing NUL; the usual ``indexed`` probing applies. ``postmap``
    rebuilds a cdb file as ``NAME.cdb.tmp`` and renames it: the next access notices
    the new file and maps it instead. Sequence returns the records in file order.

    cdb files cannot be changed in place: a read-write open (proxywrite) is an open
    error, so the table is unavailable there rather than fatal. ``write_cdb`` builds a
    whole file (temporary file, then rename) for tools and tests.

SEE ALSO
    indexed.py, docs/TABLES.md 3.3, https://cr.yp.to/cdb/cdb.txt
"""

from __future__ import annotations

import functools
import mmap
import os
import struct
from collections.abc import Callable, Iterable, Iterator

from proxymap.tables.base import DictOpenError, DictRetry, OpenContext
from proxymap.tables.indexed import IndexedFileTable, damaged_error, open_error

HEADER_SIZE = 2048
TABLE_COUNT = 256
_PAIR = struct.Struct("<II")
_HEADER = struct.Struct("<512I")
_UINT32_LIMIT = 1 << 32


class CdbFormatError(Exception):
    """The file is not a valid cdb file (Postfix reports EPROTO, 'Protocol error')."""


# The hash is a byte-at-a-time loop, by far the largest cost of a lookup in Python;
# mail keys repeat (recipients, domains, client addresses), and a repeated key's hash
# is remembered. Bounded: 4,096 keys, about 0.7 MiB per worker (tracemalloc).
@functools.lru_cache(maxsize=4096)
def cdb_hash(data: bytes) -> int:
    """The cdb hash of ``data`` (32 bits)."""
    h = 5381
    for byte in data:
        h = (((h << 5) + h) & 0xFFFFFFFF) ^ byte
    return h


class CdbReader:
    """Read-only view of one cdb file (any object supporting the buffer protocol)."""

    def __init__(self, data: mmap.mmap | bytes) -> None:
        self._data = data
        self._size = len(data)
        if self._size < HEADER_SIZE:
            raise CdbFormatError("file is shorter than the cdb header")
        words = _HEADER.unpack_from(data, 0)
        self._tables = [(words[2 * i], words[2 * i + 1]) for i in range(TABLE_COUNT)]
        for position, slots in self._tables:
            if slots and (position < HEADER_SIZE or position + 8 * slots > self._size):
                raise CdbFormatError("hash table outside the file")
        # Records end where the first hash table starts (tables follow the records).
        self.data_end = self._tables[0][0]
        if not HEADER_SIZE <= self.data_end <= self._size:
            raise CdbFormatError("bad end of records")

    @classmethod
    def open(cls, path: str) -> CdbReader:
        with open(path, "rb") as file:
            size = os.fstat(file.fileno()).st_size
            if size < HEADER_SIZE:
                raise CdbFormatError("file is shorter than the cdb header")
            return cls(mmap.mmap(file.fileno(), size, prot=mmap.PROT_READ))

    def close(self) -> None:
        if isinstance(self._data, mmap.mmap):
            self._data.close()

    def _record(self, position: int) -> tuple[int, int, int]:
        """(key offset, key length, value length) of the record at ``position``."""
        if position + 8 > self._size:
            raise CdbFormatError("record header outside the file")
        key_length, value_length = _PAIR.unpack_from(self._data, position)
        if position + 8 + key_length + value_length > self._size:
            raise CdbFormatError("record outside the file")
        return position + 8, key_length, value_length

    def get(self, key: bytes) -> bytes | None:
        """The value of the first record with ``key``, or None."""
        h = cdb_hash(key)
        table, slots = self._tables[h & 0xFF]
        if not slots:
            return None
        slot = (h >> 8) % slots
        data = self._data
        for _probe in range(slots):
            slot_hash, position = _PAIR.unpack_from(data, table + 8 * slot)
            if position == 0:
                return None
            if slot_hash == h:
                start, key_length, value_length = self._record(position)
                if key_length == len(key) and data[start : start + key_length] == key:
                    return data[start + key_length : start + key_length + value_length]
            slot = slot + 1 if slot + 1 < slots else 0
        return None

    def records_from(self, position: int) -> Iterator[tuple[int, bytes, bytes]]:
        """Records in file order from ``position``: (next position, key, value)."""
        data = self._data
        while position < self.data_end:
            start, key_length, value_length = self._record(position)
            key = data[start : start + key_length]
            value = data[start + key_length : start + key_length + value_length]
            position = start + key_length + value_length
            yield position, key, value

    def __iter__(self) -> Iterator[tuple[bytes, bytes]]:
        for _next, key, value in self.records_from(HEADER_SIZE):
            yield key, value


class CdbWriter:
    """Build a cdb file into an open binary file positioned at 0."""

    def __init__(self, file) -> None:
        self._file = file
        self._position = HEADER_SIZE
        self._entries: list[list[tuple[int, int]]] = [[] for _ in range(TABLE_COUNT)]
        file.write(b"\0" * HEADER_SIZE)

    def add(self, key: bytes, value: bytes) -> None:
        self._file.write(_PAIR.pack(len(key), len(value)) + key + value)
        h = cdb_hash(key)
        self._entries[h & 0xFF].append((h, self._position))
        self._position += 8 + len(key) + len(value)
        if self._position >= _UINT32_LIMIT:
            raise CdbFormatError("cdb file would exceed 4 GiB")

    def finish(self) -> None:
        header: list[int] = []
        for entries in self._entries:
            slots = 2 * len(entries)  # half full: short probe chains
            table = [(0, 0)] * slots
            for h, position in entries:
                slot = (h >> 8) % slots
                while table[slot][1]:
                    slot = slot + 1 if slot + 1 < slots else 0
                table[slot] = (h, position)
            header.extend((self._position, slots))
            self._file.write(b"".join(_PAIR.pack(*pair) for pair in table))
            self._position += 8 * slots
        if self._position >= _UINT32_LIMIT:
            raise CdbFormatError("cdb file would exceed 4 GiB")
        self._file.seek(0)
        self._file.write(_HEADER.pack(*header))
        self._file.flush()


def write_cdb(path: str, items: Iterable[tuple[bytes, bytes]]) -> None:
    """Write a complete cdb file atomically (``path.tmp``, fsync, rename)."""
    temporary = path + ".tmp"
    with open(temporary, "wb") as file:
        writer = CdbWriter(file)
        for key, value in items:
            writer.add(key, value)
        writer.finish()
        os.fsync(file.fileno())
    os.rename(temporary, path)


class CdbTable(IndexedFileTable[CdbReader]):
    """``cdb:NAME``: read-only constant database ``NAME.cdb``."""

    dict_type = "cdb"
    suffix = ".cdb"
    distrust_recent_stamps = False  # rebuilt by rename: the inode number tells

    def __init__(self, name: str, open_mode: int, flags: int, ctx: OpenContext) -> None:
        if (open_mode & os.O_ACCMODE) != os.O_RDONLY:
            raise DictOpenError(f"cdb:{name} map requires O_RDONLY access mode")
        self._next_position: int | None = None
        super().__init__(name, open_mode, flags, ctx)

    # cdb readers never lock: files are replaced whole, never rewritten in place.

    def _backend_open(self, fd: int, _create: bool, _truncate: bool) -> CdbReader:  # read-only
        try:
            size = os.fstat(fd).st_size
            if size < HEADER_SIZE:
                raise CdbFormatError("file is shorter than the cdb header")
            reader = CdbReader(mmap.mmap(fd, size, prot=mmap.PROT_READ))
        except CdbFormatError as exc:
            raise damaged_error(self.path, f"Protocol error ({exc})")
        except OSError as exc:
            raise open_error(self.path, exc)
        self._next_position = None
        return reader

    def _backend_close(self) -> None:
        self._live_handle().close()

    def _backend_get(self, raw_key: bytes) -> bytes | None:
        try:
            return self._live_handle().get(raw_key)
        except CdbFormatError as exc:
            raise self._read_failure(exc)

    library_errors = (CdbFormatError,)

    def _direct_get(self, handle: CdbReader) -> Callable[[bytes], bytes | None]:
        return handle.get

    def _read_failure(self, exc: Exception) -> DictRetry:
        return DictRetry(f"error reading {self.path}: Protocol error ({exc})")

    def _backend_first(self) -> tuple[bytes, bytes] | None:
        self._next_position = HEADER_SIZE
        return self._backend_next()

    def _backend_next(self) -> tuple[bytes, bytes] | None:
        if self._next_position is None:
            return None
        try:
            for position, key, value in self._live_handle().records_from(self._next_position):
                self._next_position = position
                return key, value
        except CdbFormatError as exc:
            raise DictRetry(f"error reading {self.path}: Protocol error ({exc})")
        self._next_position = None
        return None
