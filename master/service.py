"""The contract between the multi-server skeleton and the service it runs.

NAME
    service -- hooks a service plugs into ``master.multi_server`` (Postfix's
    ``multi_server_main`` call-back arguments, as a Python protocol)

DESCRIPTION
    The skeleton (``master.multi_server.MultiServer``) owns the process: argv, main.cf,
    privileges, the listen fds inherited from the master, status notifications, max_use,
    max_idle and the event loop (asyncio). The service owns what is said on a connection.

    Order of calls, as in Postfix:
      1. ``pre_init(server)``   -- as root, before privilege drop and chroot
      2. ``post_init(server)``  -- after privilege drop and chroot
      3. per accept: ``pre_accept(server)`` (may end the process with ``server.exit``),
         then ``accept()``, then the service's protocol object gets ``connection_made``
         (its post-accept work, e.g. the proxymap announcement).
      -S mode: ``serve_standalone(server, stdin, stdout)`` once, then exit 0.
    ``waiting_for_backends(server)`` is asked when a client waits to be accepted while
    the process is busy: it is one way to be saturated (see ``master.multi_server``).

    A service's connection protocol subclasses ``master.multi_server.ClientProtocol``
    (an ``asyncio.Protocol``) and must call ``server.request_started()`` before and
    ``server.request_done()`` after each request it serves: the skeleton derives the
    TAKEN/AVAIL messages from them (see ``master.multi_server``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, BinaryIO, Protocol

if TYPE_CHECKING:
    from master.multi_server import MultiServer


class Service(Protocol):
    """What a service gives the skeleton."""

    #: default service name; the real one is ``-n`` or basename(argv[0])
    name: str

    def pre_init(self, server: MultiServer) -> None: ...

    def post_init(self, server: MultiServer) -> None: ...

    def pre_accept(self, server: MultiServer) -> None: ...

    def waiting_for_backends(self, server: MultiServer) -> bool:
        """Requests wait for a backend this process may not ask more of (every
        connection it may open is busy): a sibling, with connections of its own,
        would serve sooner. Asked when a client waits to be accepted."""
        ...

    def protocol_factory(self, server: MultiServer) -> Callable[[], asyncio.Protocol]: ...

    def serve_standalone(
        self, server: MultiServer, infile: BinaryIO, outfile: BinaryIO
    ) -> None: ...
