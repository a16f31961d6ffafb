"""Dictionary flag bits (Postfix ``dict.h``), shared by the protocol, the handler and every table.

Values are wire-visible: clients send and receive them as unsigned 32-bit decimals, so they
must equal Postfix's bit for bit (see ``docs/PROTOCOL.md`` section 3).
"""

from __future__ import annotations

DUP_WARN = 0x1
DUP_IGNORE = 0x2
TRY0NULL = 0x4
TRY1NULL = 0x8
FIXED = 0x10
PATTERN = 0x20
LOCK = 0x40
DUP_REPLACE = 0x80
SYNC_UPDATE = 0x100
DEBUG = 0x200  # 3.7-3.10 only
FOLD_KEY = 0x400  # obsolete, never acted upon
NO_REGSUB = 0x800
NO_PROXY = 0x1000
NO_UNAUTH = 0x2000
FOLD_FIX = 0x4000
FOLD_MUL = 0x8000
OPEN_LOCK = 0x10000
BULK_UPDATE = 0x20000
MULTI_WRITER = 0x40000
UTF8_REQUEST = 0x80000
UTF8_ACTIVE = 0x100000
SRC_RHS_IS_FILE = 0x200000
SURROGATE = 0x400000  # 3.11+ only

FOLD_ANY = FOLD_FIX | FOLD_MUL
DUP_ANY = DUP_WARN | DUP_IGNORE | DUP_REPLACE
TRY_ANY = TRY0NULL | TRY1NULL

# The flag word is a C unsigned int: every computed mask is cut to 32 bits.
ALL = 0xFFFFFFFF

# Postfix 3.7-3.10 split of the flag word (removed in 3.11, where clients send everything).
IMPL_MASK = FIXED | PATTERN | MULTI_WRITER  # 0x00040030: set by the table itself
RQST_MASK = 0x0008F9C3  # per-request bits a client may vary
INST_MASK = ~(IMPL_MASK | RQST_MASK) & ALL  # 0xFFF3060C: select the instance

_NAMES = [
    (DUP_WARN, "warn_dup"),
    (DUP_IGNORE, "ignore_dup"),
    (TRY0NULL, "try0null"),
    (TRY1NULL, "try1null"),
    (FIXED, "fixed"),
    (PATTERN, "pattern"),
    (LOCK, "lock"),
    (DUP_REPLACE, "dup_replace"),
    (SYNC_UPDATE, "sync_update"),
    (DEBUG, "debug"),
    (NO_REGSUB, "no_regsub"),
    (NO_PROXY, "no_proxy"),
    (NO_UNAUTH, "no_unauth"),
    (FOLD_FIX, "fold_fix"),
    (FOLD_MUL, "fold_mul"),
    (OPEN_LOCK, "open_lock"),
    (BULK_UPDATE, "bulk_update"),
    (MULTI_WRITER, "multi_writer"),
    (UTF8_REQUEST, "utf8_request"),
    (UTF8_ACTIVE, "utf8_active"),
    (SRC_RHS_IS_FILE, "src_rhs_is_file"),
    (SURROGATE, "surrogate"),
]


def flag_names(flags: int) -> str:
    """Render flags like Postfix's ``dict_flags_str`` (``fixed|lock``; unknown bits in hex)."""
    parts = []
    rest = flags & ALL
    for bit, name in _NAMES:
        if rest & bit:
            parts.append(name)
            rest &= ~bit
    if rest:
        parts.append(f"0x{rest:x}")
    return "|".join(parts)
