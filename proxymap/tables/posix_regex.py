"""POSIX extended regular expressions of the C library, with byte (C locale) semantics.

NAME
    posix_regex -- ctypes binding to glibc regcomp/regexec/regerror/regfree

SYNOPSIS
    with c_locale():
        regex = PosixRegex(b"^(a|ab)(c|bcd)(d*)$", REG_EXTENDED | REG_ICASE)
        spans = regex.search(b"abcd", 4)     # [(0, 4), (0, 1), (1, 4), (4, 4)] or None
    regex.free()

DESCRIPTION
    regexp_table(5) is defined by whatever the C library's regexec does, quirks included
    (leftmost-longest matching, glibc's sub-match assignment, ``\\d`` being no digit
    class), so the table calls the C library itself instead of translating to Python
    ``re``.

    glibc compiles and runs a pattern according to the *thread's* LC_CTYPE and
    LC_COLLATE. Python sets LC_CTYPE from the environment at start-up (often C.UTF-8),
    which would make ``.`` match a whole UTF-8 character. Postfix daemons run in the C
    locale. ``c_locale()`` therefore switches only the calling thread to a private C
    locale object (newlocale + uselocale) for the duration of a compile or a lookup and
    then restores the previous one: unlike setlocale(LC_ALL, "C") it changes nothing for
    the rest of the process (other threads, Python's own locale-aware code).

    Structure layouts: ``regex_t`` is 64 bytes on LP64 glibc (x86_64, aarch64) with
    ``re_nsub`` at offset 48; ``regmatch_t`` is two ``regoff_t`` which glibc defines
    as ``int``.

BUGS
    glibc only. Another C library would need its own layouts.
"""

from __future__ import annotations

import ctypes
import struct
from collections.abc import Iterator
from contextlib import contextmanager

REG_EXTENDED = 1
REG_ICASE = 2
REG_NEWLINE = 4
REG_NOSUB = 8
REG_NOMATCH = 1

_LC_ALL_MASK = 0x1FBF  # glibc: every category bit except the LC_ALL slot (6)


class _RegexT(ctypes.Structure):
    """glibc's ``struct re_pattern_buffer`` (regex_t) for LP64 targets."""

    _fields_ = [
        ("buffer", ctypes.c_void_p),
        ("allocated", ctypes.c_size_t),
        ("used", ctypes.c_size_t),
        ("syntax", ctypes.c_ulong),
        ("fastmap", ctypes.c_void_p),
        ("translate", ctypes.c_void_p),
        ("re_nsub", ctypes.c_size_t),
        ("bitfields", ctypes.c_uint8 * 8),  # can_be_null, regs_allocated, ... + padding
    ]


if ctypes.sizeof(_RegexT) != 64 or _RegexT.re_nsub.offset != 48:
    # Not an LP64 glibc layout: refuse to load (regexp tables become unavailable).
    raise ImportError("regex_t layout of this platform is not supported")


class _RegmatchT(ctypes.Structure):
    _fields_ = [("rm_so", ctypes.c_int), ("rm_eo", ctypes.c_int)]


# glibc's soname, named directly: ctypes.util.find_library would run ldconfig in a
# subprocess, which a chrooted worker may not be able to do.
_LIBC = "libc.so.6"
_libc = ctypes.CDLL(_LIBC, use_errno=True)

_regcomp = _libc.regcomp
_regcomp.argtypes = [ctypes.POINTER(_RegexT), ctypes.c_char_p, ctypes.c_int]
_regcomp.restype = ctypes.c_int

_regexec = _libc.regexec
_regexec.argtypes = [
    ctypes.POINTER(_RegexT),
    ctypes.c_char_p,
    ctypes.c_size_t,
    ctypes.c_void_p,
    ctypes.c_int,
]
_regexec.restype = ctypes.c_int

# Hot path: regexec without argtypes on pre-converted arguments (ctypes then skips its
# per-argument conversion, roughly halving the cost of a call).
_fast_regexec = ctypes.CDLL(_LIBC).regexec
_fast_regexec.restype = ctypes.c_int
_SIZE_ZERO = ctypes.c_size_t(0)

_regerror = _libc.regerror
_regerror.argtypes = [ctypes.c_int, ctypes.POINTER(_RegexT), ctypes.c_char_p, ctypes.c_size_t]
_regerror.restype = ctypes.c_size_t

_regfree = _libc.regfree
_regfree.argtypes = [ctypes.POINTER(_RegexT)]
_regfree.restype = None

_newlocale = _libc.newlocale
_newlocale.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p]
_newlocale.restype = ctypes.c_void_p

_uselocale = _libc.uselocale
_uselocale.argtypes = [ctypes.c_void_p]
_uselocale.restype = ctypes.c_void_p

# One C locale object for the life of the process (never freed: it is tiny and shared).
_C_LOCALE = _newlocale(_LC_ALL_MASK, b"C", None)
if not _C_LOCALE:
    raise ImportError('newlocale(LC_ALL_MASK, "C") failed')


@contextmanager
def c_locale() -> Iterator[None]:
    """Run the block with this thread in the C locale (byte semantics)."""
    previous = _uselocale(_C_LOCALE)
    try:
        yield
    finally:
        _uselocale(previous)


class RegexCompileError(ValueError):
    """regcomp failed; the message is regerror's text."""


class PosixRegex:
    """One compiled pattern. Compile and search inside ``c_locale()``."""

    __slots__ = (
        "_regex",
        "nsub",
        "_nmatch",
        "_matches",
        "_matches_address",
        "_freed",
        "_regex_arg",
        "_nmatch_arg",
        "_matches_arg",
    )

    def __init__(self, pattern: bytes, cflags: int, nmatch: int = 0) -> None:
        """Compile; ``nmatch`` = how many leading sub-matches (incl. group 0) to report."""
        self._freed = True
        self._regex = _RegexT()
        # The C API takes a NUL-terminated string: text after a NUL is invisible to it.
        error = _regcomp(ctypes.byref(self._regex), pattern.split(b"\0", 1)[0], cflags)
        if error:
            raise RegexCompileError(regerror_text(error, self._regex))
        self._freed = False
        self.nsub = self._regex.re_nsub
        self._nmatch = nmatch
        self._matches = (_RegmatchT * max(nmatch, 1))()
        self._matches_address = ctypes.addressof(self._matches)
        self._regex_arg = ctypes.c_void_p(ctypes.addressof(self._regex))
        self._nmatch_arg = ctypes.c_size_t(nmatch)
        self._matches_arg = ctypes.c_void_p(self._matches_address)

    def matches(self, text: bytes) -> int:
        """0 = match, REG_NOMATCH = no match, other = regexec error code."""
        return _fast_regexec(self._regex_arg, text, _SIZE_ZERO, None, 0)

    def search(self, text: bytes) -> list[tuple[int, int]] | int:
        """Spans of groups 0..nmatch-1 ((-1, -1) = did not participate), or an error code."""
        error = _fast_regexec(self._regex_arg, text, self._nmatch_arg, self._matches_arg, 0)
        if error:
            return error
        raw = bytes(self._matches)
        values = struct.unpack(f"{2 * self._nmatch}i", raw[: 8 * self._nmatch])
        return [(values[i], values[i + 1]) for i in range(0, len(values), 2)]

    def error_text(self, error: int) -> str:
        return regerror_text(error, self._regex)

    def free(self) -> None:
        if not self._freed:
            self._freed = True
            _regfree(ctypes.byref(self._regex))

    def __del__(self) -> None:
        try:
            self.free()
        except Exception:  # noqa: BLE001 - interpreter shutdown: the library may be gone
            pass


def regerror_text(error: int, regex: _RegexT) -> str:
    buffer = ctypes.create_string_buffer(256)
    _regerror(error, ctypes.byref(regex), buffer, len(buffer))
    return buffer.value.decode("ascii", "replace")
