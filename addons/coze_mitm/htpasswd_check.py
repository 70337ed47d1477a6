"""Which lines of an `@htpasswd` file the running mitmproxy cannot verify (mitmproxy 12 refuses the whole file for
one apr1 line, without naming it; mitmproxy 11 takes an {SSHA} or argon2 hash for a plain-text password).

Asked by parts/login.py at start-up and by the launcher (run_mitm.py, before it starts mitmdump, and --check).
It asks mitmproxy's own htpasswd reader, so it is not core/ (no mitmproxy import there); it has no hook, so it is
not a part either, and the launcher (which depends on core/ and the package's top level only) can import it.
"""

from __future__ import annotations

from pathlib import Path

from coze_mitm.core.versions import version_tuple

_SCHEMES = (  # (prefix, what it is, what makes it)
    ("$apr1$", "apr1 MD5", "htpasswd -m"),
    ("$2y$", "bcrypt", "htpasswd -B"), ("$2b$", "bcrypt", "htpasswd -B"), ("$2a$", "bcrypt", "htpasswd -B"),
    ("{SHA}", "SHA-1", "htpasswd -s"), ("{SSHA}", "salted SHA-1 {SSHA}", "slappasswd"),
    ("{SSHA256}", "salted SHA-256 {SSHA256}", "LDAP tools"), ("{SSHA512}", "salted SHA-512 {SSHA512}", "LDAP tools"),
    ("$argon2", "argon2", "argon2 tools, not Apache's htpasswd"), ("$scrypt$", "scrypt", "not Apache's htpasswd"),
    ("$1$", "MD5-crypt", "openssl passwd -1"), ("$5$", "SHA-256-crypt", "htpasswd -2"),
    ("$6$", "SHA-512-crypt", "htpasswd -5"),
)


def scheme_of(pwhash: str) -> str:
    for prefix, name, made in _SCHEMES:
        if pwhash.startswith(prefix):
            return f"{name} ({made})"
    if len(pwhash) == 13:
        return "DES crypt (htpasswd -d)"
    if pwhash.startswith(("{", "$")):
        return "of an unknown scheme"
    return "plain text (htpasswd -p)"


# What a line's hash is, when the reader takes it for no hash at all: the line's text is then the password.
TEXT_IS_PASSWORD = "the text after the colon is itself the password"


def _line_verifier():
    """A function (user, pwhash) -> None or why the running mitmproxy cannot verify that line: it asks
    mitmproxy's own htpasswd reader (12.x: mitmproxy.utils.htpasswd; 11.x: passlib)."""
    try:
        from mitmproxy.utils import htpasswd as mitm_htpasswd  # mitmproxy >= 12
    except ImportError:
        mitm_htpasswd = None
    if mitm_htpasswd is not None:
        def verify(user: str, pwhash: str) -> str | None:
            try:
                mitm_htpasswd.HtpasswdFile(f"{user}:{pwhash}").check_password(user, "coze-mitm-probe")
            except Exception as e:
                return str(e) or type(e).__name__
            return None
        return verify

    import passlib.apache

    def verify(user: str, pwhash: str) -> str | None:
        try:
            f = passlib.apache.HtpasswdFile.from_string(f"{user}:{pwhash}\n")
            # passlib's htpasswd context ends with "plaintext", which claims every string no other scheme
            # claims ({SSHA}..., $argon2id$...): mitmproxy 11 then compares the password with the hash string
            if f.context.identify(pwhash) == "plaintext":
                return TEXT_IS_PASSWORD
            f.check_password(user, "coze-mitm-probe")
        except Exception as e:
            return str(e) or type(e).__name__
        return None
    return verify


def htpasswd_problems(path: Path) -> list[str]:
    """One message per line of an htpasswd file the running mitmproxy cannot read or verify, naming the
    line, the user, the hash scheme, what mitmproxy does about it and the fix. [] when all is well (or
    when the file cannot be read: mitmproxy itself says so)."""
    try:
        text = Path(path).read_text("utf-8")
    except (OSError, UnicodeDecodeError):
        return []
    version = mitmproxy_version()
    whole_file = version >= (12,)  # mitmproxy 12's reader refuses the whole file for one bad line
    consequence = (f"mitmproxy {'.'.join(map(str, version))} then refuses the WHOLE file "
                   "(\"Could not open htpasswd file\") and does not start" if whole_file
                   else f"mitmproxy {'.'.join(map(str, version))} loads the file but this user cannot log in")
    verify = _line_verifier()
    problems = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, pwhash = line.partition(":")
        if not sep or not user:
            problems.append(f"{path} line {number}: not USER:HASH; {consequence}; remove or fix the line")
            continue
        why = verify(user, pwhash)
        if why is None:
            continue
        if why == TEXT_IS_PASSWORD:
            problems.append(f"{path} line {number} (user {user!r}): its hash is {scheme_of(pwhash)}, which "
                            f"mitmproxy {'.'.join(map(str, version))} does not know as a hash: it takes the text "
                            "after the colon for a plain-text password, so that text itself logs in; fix: "
                            f"htpasswd -B {path} {user} (bcrypt)")
            continue
        problems.append(f"{path} line {number} (user {user!r}): its hash is {scheme_of(pwhash)}, which "
                        f"this mitmproxy cannot verify ({why}); {consequence}; fix: htpasswd -B {path} {user} "
                        "(bcrypt)")
    return problems


def mitmproxy_version() -> tuple[int, ...]:
    from mitmproxy import version

    return version_tuple(version.VERSION)
