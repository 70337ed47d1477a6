"""Token exchange (``POST /api/permission/oauth2/token``) and the access-token check every API call makes.

As strict as Coze where it matters: an RS256 JWT with the app's kid, iss, aud, iat, exp, a single-use
jti and an optional session_name; the answer's ``expires_in`` is an absolute unix time.
"""

from __future__ import annotations

import json
import secrets
import time
from typing import TYPE_CHECKING

import jwt

from .common import JWT_GRANT_TYPE, is_int, is_number

if TYPE_CHECKING:
    from .server import Handler
    from .state import State

DEFAULT_DURATION = 900
MAX_DURATION = 86399
IAT_FUTURE_LEEWAY = 60
HANG_SECONDS = 30.0


class TokenError(Exception):
    def __init__(self, status: int, error_code: str, message: str):
        super().__init__(message)
        self.status = status
        self.error_code = error_code
        self.message = message


def verify_jwt(st: "State", authorization: str | None) -> dict:
    if not authorization:
        raise TokenError(401, "invalid_request", "missing Authorization header: expected 'Bearer <JWT>'")
    scheme, _, tok = authorization.strip().partition(" ")
    tok = tok.strip()
    if scheme.lower() != "bearer" or not tok:
        raise TokenError(401, "invalid_request", "Authorization must be 'Bearer <JWT>'")
    try:
        header = jwt.get_unverified_header(tok)
    except jwt.PyJWTError as e:
        raise TokenError(401, "invalid_request", f"the bearer value is not a JWT ({e})") from None
    if header.get("alg") != "RS256":
        raise TokenError(401, "invalid_client", f"JWT header alg must be RS256, got {header.get('alg')!r}")
    if header.get("typ") != "JWT":
        raise TokenError(401, "invalid_request", f"JWT header typ must be 'JWT', got {header.get('typ')!r}")
    if header.get("kid") != st.kid:
        raise TokenError(
            401, "invalid_client",
            f"unknown kid {header.get('kid')!r}: the JWT header kid must be the app's public_key_id",
        )
    try:
        decoded = jwt.PyJWS().decode_complete(tok, key=st.public_key, algorithms=["RS256"])
    except jwt.InvalidSignatureError:
        raise TokenError(
            401, "invalid_client", "JWT signature does not verify with the public key registered for this kid"
        ) from None
    except jwt.PyJWTError as e:
        raise TokenError(401, "invalid_request", f"JWT does not decode ({e})") from None
    try:
        claims = json.loads(decoded["payload"])
    except ValueError:
        claims = None
    if not isinstance(claims, dict):
        raise TokenError(401, "invalid_request", "JWT payload is not a JSON object")

    now = time.time()
    if claims.get("iss") != st.client_id:
        raise TokenError(401, "invalid_client", f"iss {claims.get('iss')!r} is not this app's client_id")
    if claims.get("aud") != st.audience:
        raise TokenError(
            401, "invalid_request",
            f"aud {claims.get('aud')!r} must be the API host without scheme: {st.audience!r}",
        )
    for name in ("iat", "exp"):
        if not is_number(claims.get(name)):
            raise TokenError(401, "invalid_request", f"claim {name} is required (a unix time)")
    if claims["exp"] <= now:
        raise TokenError(401, "invalid_request", "JWT expired: exp is in the past")
    if claims["iat"] > now + IAT_FUTURE_LEEWAY:
        raise TokenError(401, "invalid_request", "JWT iat is in the future; check the clock")
    nbf = claims.get("nbf")
    if nbf is not None and (not is_number(nbf) or nbf > now + IAT_FUTURE_LEEWAY):
        raise TokenError(401, "invalid_request", "JWT not valid yet (nbf)")
    jti = claims.get("jti")
    if not isinstance(jti, str) or not jti:
        raise TokenError(401, "invalid_request", "claim jti is required (a fresh random string per JWT)")
    sn = claims.get("session_name")
    if sn is not None and not isinstance(sn, str):
        raise TokenError(401, "invalid_request", "claim session_name must be a string")
    with st.lock:
        if jti in st.used_jti:
            raise TokenError(401, "invalid_request", "jti already used: a JWT can be exchanged only once")
    return claims


def check_token_body(content_type: str | None, body: bytes) -> int:
    ctype = (content_type or "").split(";")[0].strip().lower()
    if ctype != "application/json":
        raise TokenError(400, "invalid_request", f"Content-Type must be application/json, got {content_type!r}")
    try:
        data = json.loads(body.decode("utf-8")) if body else None
    except (ValueError, UnicodeDecodeError):
        raise TokenError(400, "invalid_request", "request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise TokenError(400, "invalid_request", "request body must be a JSON object")
    gt = data.get("grant_type")
    if gt is None:
        raise TokenError(400, "invalid_request", f"grant_type is required: {JWT_GRANT_TYPE!r}")
    if gt != JWT_GRANT_TYPE:
        raise TokenError(400, "unsupported_grant_type", f"grant_type {gt!r} is not supported; use {JWT_GRANT_TYPE!r}")
    d = data.get("duration_seconds")
    if d is None:
        return DEFAULT_DURATION
    if not is_int(d) or not 1 <= d <= MAX_DURATION:
        raise TokenError(400, "invalid_request", f"duration_seconds must be an integer in 1..{MAX_DURATION}, got {d!r}")
    return d


def consume_jti(st: "State", jti: str, exp: float) -> None:
    now = time.time()
    with st.lock:
        if jti in st.used_jti:
            raise TokenError(401, "invalid_request", "jti already used: a JWT can be exchanged only once")
        if len(st.used_jti) > 50_000:  # an expired JWT is refused anyway: forget its jti
            st.used_jti = {j: e for j, e in st.used_jti.items() if e > now}
        st.used_jti[jti] = float(exp)


def issue_token(st: "State", claims: dict, duration: int, mode: str) -> dict:
    now = time.time()
    token = "czs_" + secrets.token_urlsafe(36)
    if mode == "expired":
        expires_at = int(now) - 600
        answer = expires_at
    elif mode == "duration":
        expires_at = int(now + duration)
        answer = duration  # the wrong reading: a duration instead of an absolute time
    else:
        expires_at = int(now + duration)
        answer = expires_at
    sn = claims.get("session_name")
    with st.lock:
        st.tokens[token] = {
            "session": sn if sn is not None else "",
            "session_name": sn,
            "expires_at": expires_at,
            "revoked": None,
        }
        st.exchanges.append({
            "session_name": sn,
            "jti": claims["jti"],
            "duration_seconds": duration,
            "time": now,
            "access_token": token,
            "expires_in": answer,
            "token_mode": mode,
        })
    return {"access_token": token, "expires_in": answer, "token_type": "Bearer"}


def check_access(st: "State", authorization: str | None) -> tuple[dict | None, str, str]:
    """-> (token record, problem, message); problem is "" when the token is good, "401" or "200" (the
    HTTP status Coze answers a revoked token with) otherwise."""
    if not authorization:
        return None, "401", "missing Authorization header: expected 'Bearer <access token>'"
    scheme, _, tok = authorization.strip().partition(" ")
    tok = tok.strip()
    if scheme.lower() != "bearer" or not tok:
        return None, "401", "Authorization must be 'Bearer <access token>'"
    with st.lock:
        rec = st.tokens.get(tok)
        if rec is None:
            return None, "401", "access token unknown to this sandbox (not minted here)"
        if rec["revoked"] == "200":
            return None, "200", "access token invalid"
        if rec["revoked"] == "401":
            return None, "401", "access token revoked"
        if rec["expires_at"] <= time.time():
            return None, "401", "access token expired"
        return rec, "", ""


def token(st: "State", req: "Handler") -> None:
    """POST /api/permission/oauth2/token: a JWT in, an access token out (or Coze's OAuth error body)."""
    try:
        claims = verify_jwt(st, req.headers.get("Authorization"))
        duration = check_token_body(req.headers.get("Content-Type"), req.body)
        consume_jti(st, claims["jti"], claims["exp"])
    except TokenError as e:
        return req.send_json(e.status, {"error_code": e.error_code, "error_message": e.message, "error": e.error_code})
    delay = st.token_delay
    if delay > 0 and st.stopping.wait(delay):
        req.close_connection = True
        return
    mode = st.token_mode
    if mode == "hang":
        if st.stopping.wait(HANG_SECONDS):
            req.close_connection = True
            return
        mode = "ok"
    if mode == "http500":
        return req.send_bytes(500, b"upstream exploded", "text/plain; charset=utf-8")
    if mode == "garbage":
        return req.send_bytes(200, b"<html>nope</html>", "text/html; charset=utf-8")
    if mode == "no_token":
        return req.send_json(200, {"token_type": "Bearer", "expires_in": int(time.time() + duration)})
    req.send_json(200, issue_token(st, claims, duration, mode))
