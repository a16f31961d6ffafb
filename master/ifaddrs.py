"""The addresses of this host's network interfaces (getifaddrs), for ``mynetworks``.

NAME
    ifaddrs -- interface addresses and netmasks, in getifaddrs() order

DESCRIPTION
    Postfix computes the default ``mynetworks`` from the interfaces that are up. Python's
    standard library has no getifaddrs(), so this calls the C library through ctypes.
    It is imported only when that default is needed: ctypes adds memory to every worker.
"""

from __future__ import annotations

import ctypes
import ipaddress
import socket


class _Sockaddr(ctypes.Structure):
    _fields_ = [("sa_family", ctypes.c_ushort), ("sa_data", ctypes.c_char * 14)]


class _Ifaddrs(ctypes.Structure):
    pass


_Ifaddrs._fields_ = [
    ("ifa_next", ctypes.POINTER(_Ifaddrs)),
    ("ifa_name", ctypes.c_char_p),
    ("ifa_flags", ctypes.c_uint),
    ("ifa_addr", ctypes.POINTER(_Sockaddr)),
    ("ifa_netmask", ctypes.POINTER(_Sockaddr)),
    ("ifa_ifu", ctypes.POINTER(_Sockaddr)),
    ("ifa_data", ctypes.c_void_p),
]

_IFF_UP = 0x1
# Where the address bytes sit inside sockaddr_in / sockaddr_in6.
_ADDRESS_SLICE = {socket.AF_INET: (4, 8), socket.AF_INET6: (8, 24)}


def _sockaddr_bytes(pointer) -> bytes | None:
    family = pointer.contents.sa_family
    if family not in _ADDRESS_SLICE:
        return None
    start, end = _ADDRESS_SLICE[family]
    return ctypes.string_at(ctypes.addressof(pointer.contents), end)[start:end]


def local_interfaces() -> list[ipaddress.IPv4Interface | ipaddress.IPv6Interface]:
    """Addresses (with netmask) of the interfaces that are up, in getifaddrs() order."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)  # no ldconfig subprocess (chroot)
    head = ctypes.POINTER(_Ifaddrs)()
    if libc.getifaddrs(ctypes.byref(head)) != 0:
        return []
    found = []
    try:
        entry = head
        while entry:
            item = entry.contents
            if item.ifa_addr and item.ifa_netmask and item.ifa_flags & _IFF_UP:
                address = _sockaddr_bytes(item.ifa_addr)
                mask = _sockaddr_bytes(item.ifa_netmask)
                if address is not None and mask is not None and len(address) == len(mask):
                    prefix = bin(int.from_bytes(mask, "big")).count("1")
                    found.append(ipaddress.ip_interface((address, prefix)))
            entry = item.ifa_next
    finally:
        libc.freeifaddrs(head)
    return found
