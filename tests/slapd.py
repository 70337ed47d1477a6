"""A real OpenLDAP server (slapd) for tests: a temp directory, a generated slapd.conf, an mdb database
loaded from an LDIF with slapadd, listening on a free loopback port. `Slapd.start()` raises `Unavailable`
(with the reason) where slapd is not installed or does not start; tests skip on it.

The directory: dc=example,dc=org, admin cn=admin,dc=example,dc=org, and under ou=people:
  alice  (uid alice, cn "alice" and cn "Alice Liddell"), bob (uid bob, cn "bob"), carol (uid carol).
and under ou=contractors: another carol (uid carol too, cn "Carol Contractor"), outside the ou=people subtree
the other tests search; `spec(subtree=SUFFIX)` searches both.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

from tests.harness import end, free_port

SUFFIX = "dc=example,dc=org"
ADMIN_DN = f"cn=admin,{SUFFIX}"
ADMIN_PW = "admin-Pw-31d8e0c7"
PEOPLE = f"ou=people,{SUFFIX}"
PASSWORDS = {"alice": "alice-Pw-5c1e77a0", "bob": "bob-Pw-90d2b4e1", "carol": "carol-Pw-2f6a11d4"}
CNS = {"alice": ["alice", "Alice Liddell"], "bob": ["bob"], "carol": ["carol"]}
SURNAMES = {"alice": "Liddell", "bob": "Builder", "carol": "Danvers"}
CONTRACTORS = f"ou=contractors,{SUFFIX}"
CONTRACTOR_CN = "Carol Contractor"  # uid carol, like people's carol
CONTRACTOR_PW = "contractor-Pw-6b0e3f58"
CONTRACTOR_DN = f"cn={CONTRACTOR_CN},{CONTRACTORS}"

SCHEMA_DIRS = ("/etc/ldap/schema", "/etc/openldap/schema", "/usr/local/etc/openldap/schema")
MODULE_DIRS = ("/usr/lib/ldap", "/usr/lib/openldap", "/usr/lib64/openldap", "/usr/local/libexec/openldap")


class Unavailable(Exception):
    pass


def dn_of(user: str) -> str:
    return f"uid={user},{PEOPLE}"


def _find(names, dirs) -> Path | None:
    for d in dirs:
        for n in names:
            p = Path(d) / n
            if p.exists():
                return p
    return None


def _ldif() -> str:
    out = [f"dn: {SUFFIX}\nobjectClass: dcObject\nobjectClass: organization\ndc: example\no: Example\n",
           f"dn: {PEOPLE}\nobjectClass: organizationalUnit\nou: people\n"]
    for user, password in PASSWORDS.items():
        cns = "".join(f"cn: {cn}\n" for cn in CNS[user])
        out.append(f"dn: {dn_of(user)}\nobjectClass: inetOrgPerson\nuid: {user}\n{cns}sn: {SURNAMES[user]}\n"
                   f"userPassword: {password}\n")
    out += [f"dn: {CONTRACTORS}\nobjectClass: organizationalUnit\nou: contractors\n",
            f"dn: {CONTRACTOR_DN}\nobjectClass: inetOrgPerson\nuid: carol\ncn: {CONTRACTOR_CN}\nsn: Contractor\n"
            f"userPassword: {CONTRACTOR_PW}\n"]
    return "\n".join(out)


class Slapd:
    def __init__(self, workdir: Path):
        self.dir = Path(workdir)
        self.port = 0
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"ldap://127.0.0.1:{self.port}"

    def spec(self, key: str = "cn", password: str = ADMIN_PW, subtree: str = PEOPLE) -> str:
        """mitmproxy's proxyauth spec for this directory (the form with a port)."""
        return f"ldap:127.0.0.1:{self.port}:{ADMIN_DN}:{password}:{subtree}?search_filter_key={key}"

    def start(self) -> "Slapd":
        slapd = shutil.which("slapd") or next((p for p in ("/usr/sbin/slapd", "/usr/local/libexec/slapd")
                                               if os.access(p, os.X_OK)), None)
        slapadd = shutil.which("slapadd") or ("/usr/sbin/slapadd" if os.access("/usr/sbin/slapadd", os.X_OK) else None)
        if not slapd or not slapadd:
            raise Unavailable("slapd/slapadd not installed (Debian/Ubuntu: apt-get install slapd ldap-utils)")
        schema = _find(["core.schema"], SCHEMA_DIRS)
        if schema is None:
            raise Unavailable("OpenLDAP's schema files (core.schema) not found")
        modules = _find(["back_mdb.so", "back_mdb.la"], MODULE_DIRS)
        db = self.dir / "db"
        db.mkdir(parents=True, exist_ok=True)
        conf = self.dir / "slapd.conf"
        lines = [f"include {schema.parent / s}.schema" for s in ("core", "cosine", "inetorgperson")]
        if modules is not None:
            lines += [f"modulepath {modules.parent}", "moduleload back_mdb"]
        lines += [f"pidfile {self.dir / 'slapd.pid'}", "database mdb", "maxsize 10485760",
                  f'suffix "{SUFFIX}"', f'rootdn "{ADMIN_DN}"', f"rootpw {ADMIN_PW}", f"directory {db}",
                  "access to attrs=userPassword by anonymous auth by * none", "access to * by * read"]
        conf.write_text("\n".join(lines) + "\n")
        ldif = self.dir / "people.ldif"
        ldif.write_text(_ldif())
        added = subprocess.run([slapadd, "-f", str(conf), "-l", str(ldif)], capture_output=True, text=True)
        if added.returncode != 0:
            raise Unavailable(f"slapadd failed: {added.stderr.strip()[-400:]}")
        for _ in range(5):  # a free port can be taken between the probe and slapd's bind: try again
            self.port = free_port()
            self.proc = subprocess.Popen([slapd, "-d", "0", "-f", str(conf), "-h", self.url],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and self.proc.poll() is None:
                try:
                    socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                    return self
                except OSError:
                    time.sleep(0.05)
            self.stop()
        raise Unavailable("slapd did not start listening on a loopback port")

    def stop(self) -> None:
        end(self.proc)
