"""Privilege drop and chroot for a child process (Postfix chroot_uid).

NAME
    privs -- become mail_owner, optionally inside the queue directory

SYNOPSIS
    drop_privileges(user="postfix", root_dir=None)            # -u
    drop_privileges(user="postfix", root_dir="/var/spool/postfix")   # -u -c
    drop_privileges(user=None, root_dir="/var/spool/postfix")  # -c only

DESCRIPTION
    In this order: look the user up, ``setgid`` and ``initgroups`` (while still root),
    ``chroot`` + ``chdir("/")``, and ``setuid`` last, so that nothing after the call
    can regain root. Used by the skeleton only when the master passed ``-u`` and/or
    ``-c``, i.e. when it runs as root.

SECURITY
    A Python process that chroots can no longer import modules from outside the
    chroot: a service must import everything it needs in ``pre_init``.

DIAGNOSTICS
    ``PrivilegeError`` with a Postfix-like message (``unknown mail_owner user: x``,
    ``setgid(105): Operation not permitted``, ``chroot(/x): ...``).
"""

from __future__ import annotations

import os
import pwd


class PrivilegeError(OSError):
    """The drop failed; str() is the text after ``fatal: ``."""


def _call(description: str, function, *args) -> None:
    try:
        function(*args)
    except OSError as error:
        raise PrivilegeError(f"{description}: {error.strerror}") from None


def lookup_user(user: str) -> pwd.struct_passwd:
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise PrivilegeError(f"unknown mail_owner user: {user}") from None
    if entry.pw_uid == 0:
        raise PrivilegeError(f"mail_owner must not be the super-user: {user}")
    return entry


def drop_privileges(user: str | None, root_dir: str | None) -> None:
    """Switch to user (if given) and chroot to root_dir (if given)."""
    entry = lookup_user(user) if user else None
    if entry is not None:
        _call(f"setgid({entry.pw_gid})", os.setgid, entry.pw_gid)
        _call(f"initgroups({user}, {entry.pw_gid})", os.initgroups, user, entry.pw_gid)
    if root_dir:
        _call(f"chroot({root_dir})", os.chroot, root_dir)
        _call("chdir(/)", os.chdir, "/")
    if entry is not None:
        _call(f"setuid({entry.pw_uid})", os.setuid, entry.pw_uid)
