"""ldap: tables against a private slapd, differential against the real Postfix.

``TestDifferential``: for every configuration of ``CASES`` and its keys, the direct
``postmap -q KEY ldap:file.cf`` (the oracle), ``proxy:ldap:file.cf`` through OUR
worker under the real Postfix master, and the same through the C proxymap. Ours
must equal the direct lookup (status and value; the raw proxymap status for
errors), and the direct lookup must equal the value pinned here (what Postfix
3.7.11 answered when the case was written). Keys are batched per ``postmap -q -``
process; a key whose lookup fails ends such a batch, so failing keys run alone.

The other tests: failover and recovery through our worker, a hung directory
(SIGSTOP) that must not hold up other tables of the same worker, and many
concurrent lookups sharing a connection.
"""

from __future__ import annotations

import asyncio
import base64
import os
import pwd
import shutil
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from proxymap import flags as F
from proxymap.tables.base import DictOpenError, DictRetry, OpenContext
from proxymap.tables.ldap import (
    LdapTable,
    attrdesc_subtype,
    c_string,
    libldap,
    quote_dn_value,
    quote_filter_value,
    split_list,
)
from tests.support.postfix import (
    PrivatePostfix,
    ensure_postfix,
    run_postmap,
    settle_files,
)
from tests.support.servers import (
    PrivateSlapd,
    ensure_server_packages,
    free_port,
    run_client,
    slapd,  # noqa: F401  (fixture)
)

pytestmark = pytest.mark.postfix

OUR_PROXYMAP = Path(os.environ.get("PYPROXYMAP_WORKER") or Path(sys.executable).parent / "proxymap")
SUFFIX = "dc=example,dc=com"
PEOPLE = f"ou=people,{SUFFIX}"
ERROR = "E"  # the lookup fails (RETRY): postmap says "fatal: ... query error"


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def directory_ldif(port: int) -> str:
    """The test directory; PORT (its own) is where the referral entry points."""
    return f"""
dn: ou=people,{SUFFIX}
objectClass: organizationalUnit
ou: people

dn: ou=groups,{SUFFIX}
objectClass: organizationalUnit
ou: groups

dn: uid=alice,{PEOPLE}
objectClass: account
objectClass: mailUser
objectClass: simpleSecurityObject
uid: alice
userPassword: alicepw
mailacceptinggeneralid: alice@example.com
maildrop: alice@mail.example.com

dn: uid=bob,{PEOPLE}
objectClass: account
objectClass: mailUser
uid: bob
mailacceptinggeneralid: bob@example.com
maildrop: bob1@mail.example.com
maildrop: bob2@mail.example.com
mail: bob-leaf@example.com

dn: uid=term,{PEOPLE}
objectClass: account
objectClass: mailUser
uid: term
mailacceptinggeneralid: term@example.com
mailacceptinggeneralid: shared@example.com
maildrop: term-drop@example.com
mailForwardingAddress: term-fwd@example.com

dn: uid=plain,{PEOPLE}
objectClass: account
objectClass: mailUser
uid: plain
mailacceptinggeneralid: shared@example.com
maildrop: plain-drop@example.com
mail: plain-leaf@example.com

dn: uid=meta,{PEOPLE}
objectClass: account
objectClass: mailUser
uid: meta
mailacceptinggeneralid: st*r(x)\\y@example.com
maildrop: meta-ok@example.com

dn: uid=unicode,{PEOPLE}
objectClass: account
objectClass: mailUser
uid: unicode
mailacceptinggeneralid:: {b64("ünï@example.com")}
maildrop:: {b64("ünï@mail.example.com")}

dn: uid=tagged,{PEOPLE}
objectClass: account
objectClass: mailUser
uid: tagged
mailacceptinggeneralid: tagged@example.com
maildrop: tagged-plain@example.com
maildrop;lang-de: tagged-de@example.com

dn: uid=valueparts,{PEOPLE}
objectClass: account
objectClass: mailUser
uid: valueparts
mailacceptinggeneralid: parts@example.com
maildrop: first@one.example
maildrop: nodomain
maildrop: last@two.example

dn: cn=staff,ou=groups,{SUFFIX}
objectClass: groupOfNames
objectClass: mailUser
cn: staff
mailacceptinggeneralid: staff@example.com
mailacceptinggeneralid: leafy@example.com
maildrop: staff-owner@example.com
mail: staff-leaf@example.com
member: uid=alice,{PEOPLE}
member: uid=bob,{PEOPLE}
member: uid=ghost,{PEOPLE}

dn: uid=plain2,{PEOPLE}
objectClass: account
objectClass: mailUser
uid: plain2
mailacceptinggeneralid: leafy@example.com
maildrop: plain2-drop@example.com
mail: plain2-leaf@example.com

dn: cn=loop1,ou=groups,{SUFFIX}
objectClass: groupOfNames
objectClass: mailUser
cn: loop1
mailacceptinggeneralid: loop@example.com
maildrop: loop1@example.com
member: cn=loop2,ou=groups,{SUFFIX}

dn: cn=loop2,ou=groups,{SUFFIX}
objectClass: groupOfNames
objectClass: mailUser
cn: loop2
maildrop: loop2@example.com
member: cn=loop1,ou=groups,{SUFFIX}

dn: uid=dyn,ou=groups,{SUFFIX}
objectClass: account
objectClass: mailUser
objectClass: labeledURIObject
uid: dyn
mailacceptinggeneralid: dyn@example.com
labeledURI: ldap:///{PEOPLE}??one?(uid=alice)
labeledURI: ldap:///{PEOPLE}?maildrop?one?(uid=bob)
labeledURI: ldap:///{PEOPLE}?cn?one?(uid=bob)
labeledURI: ldap:///ou=nowhere,{SUFFIX}??sub?(uid=bob)

dn: uid=badurl,ou=groups,{SUFFIX}
objectClass: account
objectClass: mailUser
objectClass: labeledURIObject
uid: badurl
mailacceptinggeneralid: badurl@example.com
labeledURI: ldap:///{PEOPLE}??bogus?(uid=bob)

dn: uid=baddn,{PEOPLE}
objectClass: account
objectClass: mailUser
uid: baddn
mailacceptinggeneralid: baddn@example.com
description: this is not a DN

dn: ou=domains,{SUFFIX}
objectClass: organizationalUnit
ou: domains

dn: ou=example.com,ou=domains,{SUFFIX}
objectClass: organizationalUnit
ou: example.com

dn: uid=alice,ou=example.com,ou=domains,{SUFFIX}
objectClass: account
objectClass: mailUser
uid: alice
maildrop: alice@domains.example

dn: ou=a\\2Cb\\2Bc,ou=domains,{SUFFIX}
objectClass: organizationalUnit
ou: a,b+c

dn: uid=quoted,ou=a\\2Cb\\2Bc,ou=domains,{SUFFIX}
objectClass: account
objectClass: mailUser
uid: quoted
maildrop: quoted-ok@example.com

dn: ou=aliases,{SUFFIX}
objectClass: organizationalUnit
ou: aliases

dn: uid=ally,ou=aliases,{SUFFIX}
objectClass: alias
objectClass: extensibleObject
uid: ally
aliasedObjectName: uid=alice,{PEOPLE}

dn: ou=elsewhere,{SUFFIX}
objectClass: referral
objectClass: extensibleObject
ou: elsewhere
ref: ldap://127.0.0.1:{port}/{PEOPLE}
"""


class TlsSlapd(PrivateSlapd):
    """PrivateSlapd with a certificate (a private CA, IP 127.0.0.1), STARTTLS and ldaps."""

    def __init__(self) -> None:
        super().__init__()
        self.tls_port = free_port()
        self.ca_path = self.directory / "ca.pem"
        self.cert_path = self.directory / "server.pem"
        self.key_path = self.directory / "server.key"

    @property
    def ldaps_url(self) -> str:
        return f"ldaps://127.0.0.1:{self.tls_port}/"

    def config_text(self) -> str:
        text = super().config_text()
        tls = (
            f'TLSCACertificateFile "{self.ca_path}"\n'
            f'TLSCertificateFile "{self.cert_path}"\n'
            f'TLSCertificateKeyFile "{self.key_path}"\n'
        )
        return text.replace("moduleload back_mdb\n", "moduleload back_mdb\n" + tls, 1)

    def _prepare(self) -> None:
        make_certificates(self.directory, self.ca_path, self.cert_path, self.key_path)
        super()._prepare()

    def _launch(self) -> None:
        self._popen(
            [
                slapd_program(),
                "-d",
                self.debug,
                "-f",
                str(self.conf_path),
                "-h",
                f"{self.url} {self.ldaps_url} {self.ldapi_url}",
                "-u",
                "openldap",
                "-g",
                "openldap",
            ]
        )


def slapd_program() -> str:
    return shutil.which("slapd", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") or "slapd"


def make_certificates(directory: Path, ca: Path, cert: Path, key: Path) -> None:
    """A throw-away CA and a server certificate for IP 127.0.0.1 (openssl)."""
    ca_key = directory / "ca.key"
    request = directory / "server.csr"
    extensions = directory / "server.ext"
    extensions.write_text("subjectAltName = IP:127.0.0.1\n")
    for command in (
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=pyproxymap test CA",
            "-keyout",
            str(ca_key),
            "-out",
            str(ca),
        ],
        [
            "openssl",
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(request),
        ],
        [
            "openssl",
            "x509",
            "-req",
            "-in",
            str(request),
            "-CA",
            str(ca),
            "-CAkey",
            str(ca_key),
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            str(extensions),
            "-out",
            str(cert),
        ],
    ):
        run_client(command, cwd=directory)
    openldap = pwd.getpwnam("openldap")
    for path in (ca, cert, key):
        os.chown(path, openldap.pw_uid, openldap.pw_gid)
        path.chmod(0o644 if path != key else 0o600)


BASIC = """\
server_host = {url}
search_base = dc=example,dc=com
bind = no
"""

# name -> .cf text ({url} ldap URL, {port}, {ldapi} URL, {dead}/{dead2} closed ports)
CONFIGS: dict[str, str] = {
    "basic": BASIC,
    "simplebind": "server_host = {url}\nsearch_base = dc=example,dc=com\n"
    "bind_dn = uid=alice,ou=people,dc=example,dc=com\nbind_pw = alicepw\n",
    "badbind": "server_host = {url}\nsearch_base = dc=example,dc=com\n"
    "bind_dn = uid=alice,ou=people,dc=example,dc=com\nbind_pw = wrong\n",
    "anonbind": "server_host = {url}\nsearch_base = dc=example,dc=com\n",
    "version2": "server_host = {url}\nsearch_base = dc=example,dc=com\nversion = 2\n",
    "version2nobind": BASIC + "version = 2\n",
    "hostport": "server_host = 127.0.0.1:{port}\nsearch_base = dc=example,dc=com\nbind = no\n",
    "serverport": "server_host = 127.0.0.1\nserver_port = {port}\n"
    "search_base = dc=example,dc=com\nbind = no\n",
    "ldapi": "server_host = {ldapi}\nsearch_base = dc=example,dc=com\nbind = no\n",
    "sasl": "server_host = {ldapi}\nsearch_base = dc=example,dc=com\nbind = sasl\n"
    "sasl_mechs = EXTERNAL\nversion = 3\n",
    "failover": "server_host = ldap://127.0.0.1:{dead}, ldap://127.0.0.1:{port}\n"
    "search_base = dc=example,dc=com\nbind = no\n",
    "alldead": "server_host = ldap://127.0.0.1:{dead} ldap://127.0.0.1:{dead2}\n"
    "search_base = dc=example,dc=com\nbind = no\ntimeout = 2\n",
    "special": BASIC + "terminal_result_attribute = mailForwardingAddress\n"
    "leaf_result_attribute = mail\nresult_attribute = maildrop\n"
    "special_result_attribute = member, labeledURI\n",
    "recursion": BASIC + "special_result_attribute = member\nrecursion_limit = 5\n",
    "recursion1": BASIC + "special_result_attribute = member\nrecursion_limit = 1\n",
    "baddn": BASIC + "special_result_attribute = description\n",
    "domain": BASIC + "domain = example.com, example.net\n",
    "expansion1": BASIC + "expansion_limit = 1\n",
    "expansion2": BASIC + "expansion_limit = 2\nsize_limit = 0\n"
    "special_result_attribute = member\n",
    "size1": BASIC + "size_limit = 1\n",
    "dynbase": "server_host = {url}\nsearch_base = ou=%d, ou=domains, dc=example, dc=com\n"
    "query_filter = (uid=%u)\nbind = no\n",
    "userbase": "server_host = {url}\nsearch_base = uid=%u,ou=people,dc=example,dc=com\n"
    "scope = base\nbind = no\n",
    "staticmissing": "server_host = {url}\nsearch_base = ou=missing,dc=example,dc=com\nbind = no\n",
    "scopeone": "server_host = {url}\nsearch_base = dc=example,dc=com\nscope = one\nbind = no\n",
    "scopeonepeople": "server_host = {url}\nsearch_base = ou=people,dc=example,dc=com\n"
    "scope = ONE\nbind = no\n",
    "scopebogus": BASIC + "scope = bogus\n",
    "format": BASIC + "result_format = smtp:[%s]\n",
    "formatparts": BASIC + "result_format = %u at %d\n",
    "formatkey": BASIC + "result_filter = %s key=%S user=%U dom=%D tld=%1\n",
    "formatempty": BASIC + "result_format =\n",
    "filterparts": "server_host = {url}\nsearch_base = dc=example,dc=com\nbind = no\n"
    "query_filter = (&(objectClass=mailUser)(mailacceptinggeneralid=%u@%2.%1))\n",
    "multiattr": BASIC + "result_attribute = maildrop mail, mailacceptinggeneralid\n",
    "deref0": "server_host = {url}\nsearch_base = uid=%u,ou=aliases,dc=example,dc=com\n"
    "scope = base\nquery_filter = (objectClass=*)\nbind = no\n",
    "deref3": "server_host = {url}\nsearch_base = uid=%u,ou=aliases,dc=example,dc=com\n"
    "scope = base\nquery_filter = (objectClass=*)\nbind = no\ndereference = 3\n",
    "referral": "server_host = {url}\nsearch_base = ou=elsewhere,dc=example,dc=com\nbind = no\n",
    "chase": "server_host = {url}\nsearch_base = ou=elsewhere,dc=example,dc=com\n"
    "bind = no\nchase_referrals = yes\n",
    "chaseroot": BASIC + "chase_referrals = yes\n",
    "badfilter": BASIC + "query_filter = (&(mailacceptinggeneralid=%s)\n",
    "timeout0": BASIC + "timeout = 0\n",
    "cache": BASIC + "cache = yes\ncache_expiry = 30\ncache_size = 100\n",
    "starttls": BASIC + "start_tls = yes\ntls_ca_cert_file = {ca}\ntls_require_cert = yes\n",
    "starttlsv2": BASIC + "start_tls = yes\nversion = 2\ntls_ca_cert_file = {ca}\n",
    "starttlsunknownca": BASIC + "start_tls = yes\ntls_require_cert = yes\n"
    "tls_ca_cert_file = {otherca}\n",
    "ldaps": "server_host = {ldaps}\nsearch_base = dc=example,dc=com\nbind = no\n"
    "tls_ca_cert_file = {ca}\ntls_require_cert = yes\nversion = 2\n",
    "ldapsnoverify": "server_host = {ldaps}\nsearch_base = dc=example,dc=com\n"
    "special_result_attribute = member\n",
}

ALICE = "alice@mail.example.com"
BOB = "bob1@mail.example.com,bob2@mail.example.com"

# name -> [(key, expected direct answer: value, None = not found, or ERROR)]
CASES: dict[str, list[tuple[str, str | None]]] = {
    "basic": [
        ("alice@example.com", ALICE),
        ("ALICE@Example.COM", ALICE),
        ("bob@example.com", BOB),
        ("nobody@example.com", None),
        ("alice", None),
        ("shared@example.com", "term-drop@example.com,plain-drop@example.com"),
        ("st*r(x)\\y@example.com", "meta-ok@example.com"),
        ("st*", None),
        ("*", None),
        ("*@example.com", None),
        ("(x)", None),
        ("\\", None),
        ("ünï@example.com", "ünï@mail.example.com"),
        ("ÜNÏ@EXAMPLE.COM", "ünï@mail.example.com"),
        ("tagged@example.com", "tagged-plain@example.com,tagged-de@example.com"),
        ("staff@example.com", "staff-owner@example.com"),
        ("caf\udce9@example.com", None),  # Latin-1, not UTF-8: not looked up
    ],
    "simplebind": [("alice@example.com", ALICE), ("bob@example.com", BOB)],
    "badbind": [("alice@example.com", ERROR)],
    "anonbind": [("alice@example.com", ALICE)],
    "version2": [("alice@example.com", ERROR)],
    "version2nobind": [("alice@example.com", ALICE)],
    "hostport": [("alice@example.com", ALICE)],
    "serverport": [("alice@example.com", ALICE)],
    "ldapi": [("bob@example.com", BOB)],
    "sasl": [("bob@example.com", BOB), ("nobody@example.com", None)],
    "failover": [("alice@example.com", ALICE)],
    "alldead": [("alice@example.com", ERROR), ("alice", ERROR)],
    "special": [
        ("alice@example.com", ALICE),
        ("bob@example.com", BOB + ",bob-leaf@example.com"),
        ("term@example.com", "term-fwd@example.com"),
        # Postfix carries "terminal" over to the next entry, which then adds nothing.
        ("shared@example.com", "term-fwd@example.com"),
        ("staff@example.com", f"staff-owner@example.com,{ALICE},{BOB},bob-leaf@example.com"),
        # ... and "not a leaf": plain2's leaf attribute is skipped after staff.
        (
            "leafy@example.com",
            f"staff-owner@example.com,{ALICE},{BOB},bob-leaf@example.com,plain2-drop@example.com",
        ),
        ("dyn@example.com", f"{ALICE},{BOB}"),
        ("badurl@example.com", ERROR),
    ],
    "recursion": [
        ("loop@example.com", ERROR),
        ("staff@example.com", f"staff-owner@example.com,{ALICE},{BOB}"),
    ],
    "recursion1": [("staff@example.com", ERROR), ("bob@example.com", BOB)],
    "baddn": [("baddn@example.com", ERROR), ("alice@example.com", ALICE)],
    "domain": [
        ("alice@example.com", ALICE),
        ("alice@other.org", None),
        ("alice", None),
        ("@example.com", None),
        ("alice@EXAMPLE.com", ALICE),
    ],
    "expansion1": [
        ("alice@example.com", ALICE),
        ("bob@example.com", ERROR),
        ("shared@example.com", ERROR),
    ],
    "expansion2": [
        ("bob@example.com", BOB),
        ("shared@example.com", "term-drop@example.com,plain-drop@example.com"),
        ("staff@example.com", ERROR),
    ],
    "size1": [("bob@example.com", BOB), ("shared@example.com", ERROR)],
    "dynbase": [
        ("alice@example.com", "alice@domains.example"),
        ("bob@example.com", None),
        ("alice@nodomain.org", None),
        ("alice", None),
        ("@example.com", None),
        ("quoted@a,b+c", "quoted-ok@example.com"),
    ],
    "userbase": [
        ("alice@example.com", ALICE),
        ("alice@anything", None),
        ("bob@example.com", BOB),
        ("ghost@example.com", None),
        ("alice", None),
    ],
    "staticmissing": [("alice@example.com", ERROR)],
    "scopeone": [("alice@example.com", None)],
    "scopeonepeople": [("alice@example.com", ALICE)],
    "scopebogus": [("alice@example.com", ALICE)],
    "format": [("bob@example.com", "smtp:[bob1@mail.example.com],smtp:[bob2@mail.example.com]")],
    "formatparts": [
        ("parts@example.com", "first at one.example,last at two.example"),
        ("alice@example.com", "alice at mail.example.com"),
    ],
    "formatkey": [
        ("alice@example.com", f"{ALICE} key=alice@example.com user=alice dom=example.com tld=com"),
        ("alice", None),
    ],
    "formatempty": [("alice@example.com", ALICE), ("bob@example.com", BOB)],  # = unset
    "filterparts": [("alice@example.com", ALICE), ("alice@com", None), ("alice", None)],
    "multiattr": [
        ("bob@example.com", f"bob@example.com,{BOB},bob-leaf@example.com"),
    ],
    "deref0": [("ally@x", None)],
    "deref3": [("ally@x", ALICE)],
    "referral": [("alice@example.com", ERROR)],
    "chase": [("alice@example.com", ALICE)],
    "chaseroot": [("alice@example.com", f"{ALICE},{ALICE}")],
    "badfilter": [("alice@example.com", ERROR)],
    "timeout0": [("alice@example.com", ERROR)],
    "cache": [("alice@example.com", ALICE)],
    "starttls": [("alice@example.com", ALICE), ("bob@example.com", BOB), ("x@y", None)],
    "starttlsv2": [("alice@example.com", ALICE)],  # STARTTLS forces version 3
    "starttlsunknownca": [("alice@example.com", ERROR)],
    "ldaps": [("bob@example.com", BOB)],  # ldaps forces version 3
    "ldapsnoverify": [("staff@example.com", f"staff-owner@example.com,{ALICE},{BOB}")],
}

# Where the C proxymap answers otherwise than the direct lookup: (config, key) -> answer.
C_PROXYMAP_DIFFERS: dict[tuple[str, str], str | None] = {}


# ---------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------


@dataclass
class Stack:
    directory: PrivateSlapd
    spare: PrivateSlapd
    ours: PrivatePostfix
    theirs: PrivatePostfix
    cf: dict[str, Path]

    def map(self, name: str) -> str:
        return f"ldap:{self.cf[name]}"


def write_configs(target: Path, directory: TlsSlapd, spare: PrivateSlapd) -> dict[str, Path]:
    ca, other_ca = target / "ca.pem", target / "other-ca.pem"
    shutil.copy(directory.ca_path, ca)
    make_certificates(target, other_ca, target / "other.pem", target / "other.key")
    values = {
        "url": directory.url,
        "port": directory.port,
        "ldapi": directory.ldapi_url,
        "ldaps": directory.ldaps_url,
        "ca": ca,
        "otherca": other_ca,
        "dead": free_port(),
        "dead2": free_port(),
    }
    files = {"ca": ca, "otherca": other_ca}
    for name, text in CONFIGS.items():
        files[name] = target / f"{name}.cf"
        files[name].write_text(text.format(**values))
    spare_url = spare.url
    files["spare"] = target / "spare.cf"
    files["spare"].write_text(
        f"server_host = {spare_url}\nsearch_base = {SUFFIX}\nbind = no\ntimeout = 2\n"
    )
    files["hung"] = target / "hung.cf"
    files["hung"].write_text(
        f"server_host = {spare_url}\nsearch_base = {SUFFIX}\nbind = no\ntimeout = 2\n"
    )
    for path in files.values():
        path.chmod(0o644)
    settle_files(*files.values())
    return files


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    ensure_server_packages("slapd", "ldap-utils")
    ensure_postfix()
    assert OUR_PROXYMAP.exists(), f"our worker is not installed: {OUR_PROXYMAP}"
    directory = TlsSlapd()
    directory.ldif = directory_ldif(directory.port)
    spare = PrivateSlapd(
        f"dn: uid=spare,{SUFFIX}\nobjectClass: account\nobjectClass: mailUser\n"
        "uid: spare\nmailacceptinggeneralid: spare@example.com\n"
        "maildrop: spare-ok@example.com\n"
    )
    ours = PrivatePostfix(proxymap_program=OUR_PROXYMAP, proxymap_maxproc="1", name="ldap-ours")
    theirs = PrivatePostfix(name="ldap-c")
    try:
        directory.start()
        spare.start()
        cf = write_configs(ours.tables, directory, spare)
        allowed = " ".join(
            f"proxy:ldap:{path}" for name, path in cf.items() if name not in ("ca", "otherca")
        )
        ours.proxy_read_maps = theirs.proxy_read_maps = allowed
        ours.start()
        theirs.start()
        result = Stack(directory, spare, ours, theirs, cf)
        ours.wait_until_serving("alice@example.com", result.map("basic"))
        theirs.wait_until_serving("alice@example.com", result.map("basic"))
        yield result
    finally:
        for instance in (ours, theirs):
            instance.stop()
            instance.cleanup()
        spare.close()
        directory.close()


# ---------------------------------------------------------------------------------------
# Differential
# ---------------------------------------------------------------------------------------


def batch(instance: PrivatePostfix, keys: list[str], table: str) -> dict[str, str | None]:
    """Answers of one ``postmap -q -`` run over KEYS (which must not fail)."""
    data = "".join(f"{key}\n" for key in keys).encode("utf-8", "surrogateescape")
    result = run_postmap(["-q", "-", table], conf_dir=instance.conf_dir, stdin=data)
    assert result.exit in (0, 1) and "fatal" not in result.stderr, f"{table}: {result.stderr}"
    found = dict(line.split("\t", 1) for line in result.stdout.split("\n") if line)
    return {key: found.get(key) for key in keys}


def single(instance: PrivatePostfix, key: str, table: str) -> str | None:
    result = run_postmap(["-q", key, table], conf_dir=instance.conf_dir)
    if result.exit == 0:
        return result.stdout
    return ERROR if "fatal:" in result.stderr else None


def raw_status(instance: PrivatePostfix, table: str, key: str) -> bytes:
    with instance.client(timeout=15) as client:
        return client.lookup(table, key)["status"]


KINDS = ("direct", "ours", "c")


def table_for(stack: Stack, kind: str, name: str) -> tuple[PrivatePostfix, str]:
    """Which instance's configuration, and which table name, a kind of lookup uses."""
    if kind == "direct":
        return stack.ours, stack.map(name)
    return (stack.ours if kind == "ours" else stack.theirs), "proxy:" + stack.map(name)


@pytest.fixture(scope="module")
def failing(stack: Stack) -> dict[tuple[str, str, str], str | None]:
    """Every lookup expected to fail, each in a postmap of its own, all at once: a
    failing postmap pauses a second before it exits."""
    jobs = {}
    with ThreadPoolExecutor(24) as pool:
        for name, cases in CASES.items():
            for key in (key for key, want in cases if want == ERROR):
                for kind in KINDS:
                    instance, table = table_for(stack, kind, name)
                    jobs[kind, name, key] = pool.submit(single, instance, key, table)
    return {job: future.result() for job, future in jobs.items()}


def answers(
    stack: Stack, failing: dict[tuple[str, str, str], str | None], kind: str, name: str
) -> dict[str, str | None]:
    """Every key of CASES[name]: one batch for those expected to work."""
    instance, table = table_for(stack, kind, name)
    keys = [key for key, want in CASES[name] if want != ERROR]
    got = batch(instance, keys, table) if keys else {}
    for key, want in CASES[name]:
        if want == ERROR:
            got[key] = failing[kind, name, key]
    return got


class TestDifferential:
    @pytest.mark.parametrize("name", list(CASES))
    def test_ours_equals_direct(self, stack: Stack, failing: dict, name: str) -> None:
        expected = dict(CASES[name])
        direct = answers(stack, failing, "direct", name)
        assert direct == expected, "the direct Postfix lookup disagrees with the pinned answers"
        ours = answers(stack, failing, "ours", name)
        assert ours == direct, stack.ours.log_tail(30)
        for key, want in CASES[name]:
            if want == ERROR:
                assert raw_status(stack.ours, stack.map(name), key) == b"2"

    @pytest.mark.parametrize("name", list(CASES))
    def test_c_proxymap(self, stack: Stack, failing: dict, name: str) -> None:
        theirs = answers(stack, failing, "c", name)
        expected = {key: C_PROXYMAP_DIFFERS.get((name, key), want) for key, want in CASES[name]}
        assert theirs == expected
        for key, want in CASES[name]:
            if want == ERROR:
                assert raw_status(stack.theirs, stack.map(name), key) == b"2"

    def test_open_reply_is_fixed(self, stack: Stack) -> None:
        for instance in (stack.ours, stack.theirs):
            with instance.client() as client:
                reply = client.open(stack.map("dynbase"), F.LOCK | F.FOLD_FIX)
            assert reply["status"] == b"0"
            assert int(reply["flags"]) & F.IMPL_MASK == F.FIXED


# ---------------------------------------------------------------------------------------
# Failover, recovery, a hung directory (through our worker under the real master)
# ---------------------------------------------------------------------------------------


def wire_lookup(
    instance: PrivatePostfix, table: str, key: str, timeout: float = 15
) -> tuple[bytes, bytes | None]:
    with instance.client(timeout=timeout) as client:
        reply = client.lookup(table, key)
    return reply["status"], reply.get("value")


SPARE_OK = (b"0", b"spare-ok@example.com")


class TestOutages:
    def test_restarted_directory_answers_within_5s(self, stack: Stack) -> None:
        table = stack.map("spare")
        assert wire_lookup(stack.ours, table, "spare@example.com") == SPARE_OK
        stack.spare.restart()
        # The connection the restart broke is replaced within the same lookup.
        assert wire_lookup(stack.ours, table, "spare@example.com") == SPARE_OK
        stack.spare.stop()
        assert wire_lookup(stack.ours, table, "spare@example.com")[0] == b"2"
        stack.spare.start()
        began = time.monotonic()
        while wire_lookup(stack.ours, table, "spare@example.com") != SPARE_OK:
            assert time.monotonic() - began < 5, stack.ours.log_tail()
            time.sleep(0.05)

    @pytest.mark.serial
    def test_hung_directory_holds_up_no_other_table(self, stack: Stack) -> None:
        """slapd stopped (SIGSTOP): the worker's other tables answer at once; the hung
        lookups answer RETRY at the table's timeout (2 s)."""
        hung, other = stack.map("hung"), stack.map("basic")
        assert wire_lookup(stack.ours, hung, "spare@example.com") == SPARE_OK
        assert wire_lookup(stack.ours, other, "alice@example.com") == (b"0", ALICE.encode())
        outcomes: list[tuple[bytes | str, float]] = []

        def hung_lookup() -> None:
            began = time.monotonic()
            try:
                status: bytes | str = wire_lookup(stack.ours, hung, "spare@example.com")[0]
            except Exception as exc:  # noqa: BLE001 - shown in the assertion below
                status = repr(exc)
            outcomes.append((status, time.monotonic() - began))

        stack.spare.stop_signal()
        try:
            threads = [threading.Thread(target=hung_lookup) for _ in range(5)]
            for thread in threads:
                thread.start()
            time.sleep(0.2)
            latencies = []
            with stack.ours.client() as client:
                for _ in range(50):
                    began = time.monotonic()
                    reply = client.lookup(other, "alice@example.com")
                    latencies.append(time.monotonic() - began)
                    assert reply["status"] == b"0"
            for thread in threads:
                thread.join(15)
        finally:
            stack.spare.cont_signal()
        # Within 10 ms (all but a few: this machine is shared, its scheduler stalls
        # any process now and then), and none anywhere near the hung ones' 2 s.
        latencies.sort()
        assert latencies[int(len(latencies) * 0.9)] < 0.010, f"slowest: {latencies[-8:]}"
        assert latencies[-1] < 0.5, f"slowest: {latencies[-8:]}"
        assert [status for status, _ in outcomes] == [b"2"] * 5, (outcomes, stack.ours.log_tail())
        assert all(1.9 < elapsed < 4 for _, elapsed in outcomes), outcomes
        assert wire_lookup(stack.ours, hung, "spare@example.com") == SPARE_OK


# ---------------------------------------------------------------------------------------
# In the worker's event loop: connections shared by concurrent lookups
# ---------------------------------------------------------------------------------------

ONE_ENTRY = f"""
dn: uid=one,{SUFFIX}
objectClass: account
objectClass: mailUser
uid: one
mailacceptinggeneralid: one@example.com
maildrop: one-ok@example.com
"""


def open_table(path: Path, **params: str) -> LdapTable:
    return LdapTable(str(path), os.O_RDONLY, F.FOLD_FIX, OpenContext(params=params))


def write_cf(path: Path, server: PrivateSlapd, extra: str = "") -> Path:
    path.write_text(f"server_host = {server.url}\nsearch_base = {SUFFIX}\nbind = no\n{extra}")
    return path


@dataclass
class Burst:
    connections: int  # server side, while the lookups were in flight
    pool_open: int
    results: list[object]


async def burst(table: LdapTable, server: PrivateSlapd, count: int) -> Burst:
    """COUNT lookups against a stopped directory, then SIGCONT: what was open meanwhile."""
    assert await table.alookup(b"one@example.com") == b"one-ok@example.com"
    server.stop_signal()
    try:
        tasks = [asyncio.ensure_future(table.alookup(b"one@example.com")) for _ in range(count)]
        await asyncio.sleep(0.5)
        seen = Burst(server.connection_count(), table.pool.open, [])
    finally:
        server.cont_signal()
    seen.results = list(await asyncio.gather(*tasks, return_exceptions=True))
    table.close()
    return seen


class TestSharedConnections:
    @pytest.mark.parametrize("limit, count, connections", [(2, 50, 1), (1, 100, 1), (2, 150, 2)])
    def test_concurrent_lookups_share_connections(
        self,
        slapd: PrivateSlapd,  # noqa: F811
        tmp_path: Path,
        limit: int,
        count: int,
        connections: int,
    ) -> None:
        slapd.add(ONE_ENTRY)
        table = open_table(
            write_cf(tmp_path / "c.cf", slapd), pyproxymap_ldap_connections=str(limit)
        )
        seen = asyncio.run(burst(table, slapd, count))
        # 64 lookups per connection: 150 need two, and the 22 beyond 128 wait for one.
        assert seen.connections == connections <= limit
        assert seen.pool_open == connections
        assert seen.results == [b"one-ok@example.com"] * count

    @pytest.mark.serial
    def test_hung_lookups_leave_the_loop_free(self, slapd: PrivateSlapd, tmp_path: Path) -> None:  # noqa: F811
        slapd.add(ONE_ENTRY)
        table = open_table(write_cf(tmp_path / "h.cf", slapd, "timeout = 1\n"))

        async def scenario() -> tuple[float, list[object], float]:
            assert await table.alookup(b"one@example.com") == b"one-ok@example.com"
            slapd.stop_signal()
            try:
                began = time.monotonic()
                tasks = [
                    asyncio.ensure_future(table.alookup(b"one@example.com")) for _ in range(20)
                ]
                lags = []
                while not all(task.done() for task in tasks):
                    tick = time.monotonic()
                    await asyncio.sleep(0.002)
                    lags.append(time.monotonic() - tick - 0.002)
                results = await asyncio.gather(*tasks, return_exceptions=True)
                elapsed = time.monotonic() - began
            finally:
                slapd.cont_signal()
            after = await table.alookup(b"one@example.com")
            assert after == b"one-ok@example.com"
            table.close()
            return sorted(lags), results, elapsed

        lags, results, elapsed = asyncio.run(scenario())
        # The loop turns every 2 ms while the lookups hang (all but a few turns within
        # 10 ms: the machine is shared), never stalled for anything like the timeout.
        assert lags[int(len(lags) * 0.95)] < 0.010, lags[-8:]
        assert lags[-1] < 0.25, lags[-8:]
        assert all(isinstance(result, DictRetry) for result in results), results
        assert 0.9 < elapsed < 2.5


# ---------------------------------------------------------------------------------------
# Pieces
# ---------------------------------------------------------------------------------------


class TestPieces:
    def test_quoting(self) -> None:
        assert quote_filter_value(b"a*(b)\\c") == b"a\\2A\\28b\\29\\5Cc"
        assert quote_filter_value("ü@x".encode()) == "ü@x".encode()
        assert quote_dn_value(b' a#b+c,d;e<f>g"h\\i\t') == (
            b"\\20a\\23b\\2Bc\\2Cd\\3Be\\3Cf\\3Eg\\22h\\5Ci\\09"
        )
        assert quote_dn_value(b"plain=ok") == b"plain=ok"

    @pytest.mark.parametrize(
        "a1, a2, relation",
        [
            ("maildrop", "maildrop", 1),
            ("MailDrop", "maildrop;lang-de", 1),
            ("maildrop;lang-de", "maildrop", -1),
            ("mail", "maildrop", 0),
            ("maildrop", "mail", 0),
            ("mail;x", "mail;y", 0),
        ],
    )
    def test_attribute_subtypes(self, a1: str, a2: str, relation: int) -> None:
        assert attrdesc_subtype(a1, a2) == relation

    def test_lists_and_c_strings(self) -> None:
        assert split_list(" a, b\tc,,d\n") == ["a", "b", "c", "d"]
        assert c_string(b"cut\0tail") == b"cut"

    def test_urls_parsed_by_libldap(self) -> None:
        lib = libldap()
        assert lib.is_url(b"ldap:///dc=x") and lib.is_url(b"LDAPI://%2Fsock")
        assert not lib.is_url(b"uid=a,dc=x")
        url = lib.parse_url(b"ldap://h:1/ou=a,dc=x?mail,cn?one?(uid=a%20b)")
        assert (url.dn, url.attrs, url.scope, url.filter) == (
            "ou=a,dc=x",
            ("mail", "cn"),
            1,
            "(uid=a b)",
        )
        bare = lib.parse_url(b"ldap:///dc=x")
        assert (bare.scope, bare.filter, bare.attrs) == (0, None, ())
        assert isinstance(lib.parse_url(b"ldap:///dc=x??bogus?"), int)

    @pytest.mark.parametrize(
        "text",
        [
            "bind = bogus\n",
            "version = 1\n",
            "recursion_limit = 0\n",
            "timeout = ten\n",
            "result_filter =\n",
            "sasl_minssf = 5000\nbind = sasl\n",
            "query_filter = %x\n",
        ],
    )
    def test_bad_configuration(self, tmp_path: Path, text: str) -> None:
        path = tmp_path / "bad.cf"
        path.write_text("search_base = dc=x\n" + text)
        with pytest.raises(DictOpenError):
            open_table(path)

    def test_open_checks(self, tmp_path: Path) -> None:
        path = tmp_path / "ok.cf"
        path.write_text(
            "server_host = ldap.example.com:1389 ldapi://%2Fsock, other\n"
            "version = 9\nscope = Base\nsearch_base = dc=x\n"
        )
        table = open_table(path)
        assert table.flags & F.FIXED
        assert table.settings.urls == [
            "ldap://ldap.example.com:1389",
            "ldapi://%2Fsock",
            "ldap://other:389",
        ]
        assert table.settings.version == 3
        with pytest.raises(DictOpenError, match="requires O_RDONLY"):
            LdapTable(str(path), os.O_RDWR, 0, OpenContext())
        with pytest.raises(DictOpenError):
            open_table(tmp_path / "missing.cf")

    def test_key_checks_before_and_after_connecting(self, tmp_path: Path) -> None:
        """Not UTF-8, or outside ``domain``: not found without a server. Any other key
        needs a connection first, as in Postfix: RETRY, even one that the templates
        would skip (the empty key, a key without the domain that ``%d`` needs)."""
        down = f"server_host = ldap://127.0.0.1:{free_port()}\nbind = no\nsearch_base = ou=%d\n"
        (tmp_path / "domain.cf").write_text(down + "domain = example.com\n")
        (tmp_path / "any.cf").write_text(down)
        filtered, unfiltered = open_table(tmp_path / "domain.cf"), open_table(tmp_path / "any.cf")

        async def lookups() -> list[object]:
            found = [
                await filtered.alookup(key) for key in (b"caf\xe9@example.com", b"a@other.org", b"")
            ]
            for table, key in (
                (filtered, b"a@example.com"),
                (unfiltered, b""),
                (unfiltered, b"nodomain"),
            ):
                with pytest.raises(DictRetry):
                    await table.alookup(key)
            filtered.close()
            unfiltered.close()
            return found

        assert asyncio.run(lookups()) == [None, None, None]

    def test_main_cf_prefix(self, stack: Stack) -> None:
        params = {
            "src_server_host": stack.directory.url,
            "src_search_base": SUFFIX,
            "src_bind": "no",
            "src_result_format": "<%s>",
        }
        table = LdapTable("src", os.O_RDONLY, F.FOLD_FIX, OpenContext(params=params))

        async def lookups() -> list[bytes | None]:
            found = [await table.alookup(key) for key in (b"BOB@example.com", b"x@y")]
            table.close()
            return found

        assert asyncio.run(lookups()) == [b"<bob1@mail.example.com>,<bob2@mail.example.com>", None]
