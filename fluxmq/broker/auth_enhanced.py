"""Enhanced authentication: challenge/response exchanges behind one small interface.

MQTT 5.0 carries them in CONNECT, AUTH and CONNACK packets (Authentication Method and Authentication
Data); the protocol layer moves the bytes and this module decides. Nothing here knows the wire
format, so another front end (a bridge, the admin API) can run the same exchanges.

An ``Authenticator`` serves one method (``method``, e.g. ``"SCRAM-SHA-256"``); ``start`` begins an
exchange for one client and each ``AuthExchange.step(data)`` answers one message of the client with
an ``AuthStep``: ``CONTINUE`` with data for the client, ``SUCCESS`` (optionally with final data and
the authenticated user name) or ``FAILURE`` with a reason and an MQTT 5.0 reason code. The same
interface serves re-authentication: the protocol layer starts a new exchange on the live connection.

``ScramSha256Authenticator`` is the example method (RFC 5802 / RFC 7677, without channel binding).
Credentials are stored as ``user:iterations:salt:stored_key:server_key`` lines (base64 fields), the
form RFC 5803 describes, so the password itself is never kept; ``python -m fluxmq.broker.auth_enhanced
USER`` reads a password from stdin and prints such a line. ``ScramClient`` is the client side, used
by tests and by anything in fluxmq that has to log in to a peer.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import sys
from collections.abc import Callable, Mapping
from typing import Protocol

from fluxmq.errors import ConfigError

CONTINUE = "continue"
SUCCESS = "success"
FAILURE = "failure"

# MQTT 5.0 reason codes an exchange may end with.
NOT_AUTHORIZED = 0x87
BAD_USER_NAME_OR_PASSWORD = 0x86
BAD_AUTHENTICATION_METHOD = 0x8C

SCRAM_SHA_256 = "SCRAM-SHA-256"
DEFAULT_ITERATIONS = 4096


class AuthStep:
    """One answer of an exchange: ``outcome`` (CONTINUE, SUCCESS, FAILURE) and what goes with it."""

    __slots__ = ("outcome", "data", "reason", "reason_code", "username")

    def __init__(
        self,
        outcome: str,
        data: bytes | None = None,
        reason: str = "",
        reason_code: int = NOT_AUTHORIZED,
        username: str | None = None,
    ) -> None:
        self.outcome = outcome
        self.data = data
        self.reason = reason
        self.reason_code = reason_code
        self.username = username

    @classmethod
    def proceed(cls, data: bytes) -> AuthStep:
        """Another round: ``data`` goes to the client, which answers with its next message."""
        return cls(CONTINUE, data)

    @classmethod
    def success(cls, username: str | None = None, data: bytes | None = None) -> AuthStep:
        """Authenticated as ``username``; ``data`` (if any) is the final message for the client."""
        return cls(SUCCESS, data, username=username)

    @classmethod
    def failure(cls, reason: str, reason_code: int = NOT_AUTHORIZED) -> AuthStep:
        return cls(FAILURE, None, reason, reason_code)

    def __repr__(self) -> str:
        return f"AuthStep({self.outcome}, data={self.data!r}, reason={self.reason!r}, user={self.username!r})"


class AuthExchange(Protocol):
    """The state of one exchange with one client."""

    def step(self, data: bytes | None) -> AuthStep:
        """Answer the client's next message (the first call gets CONNECT's or AUTH's data)."""


class Authenticator(Protocol):
    """An enhanced authentication method."""

    #: the Authentication Method name clients send
    method: str

    def start(self, client_id: str, username: str | None) -> AuthExchange:
        """Begin an exchange for a client (``username`` from CONNECT, or the authenticated one when
        re-authenticating)."""


# -- SCRAM-SHA-256 -------------------------------------------------------------------------------


def _h(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _hmac(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.sha256).digest()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"), validate=True)


class ScramCredential:
    """What the server keeps per user: salt, iterations, StoredKey and ServerKey (never the password)."""

    __slots__ = ("iterations", "salt", "stored_key", "server_key")

    def __init__(self, iterations: int, salt: bytes, stored_key: bytes, server_key: bytes) -> None:
        self.iterations = iterations
        self.salt = salt
        self.stored_key = stored_key
        self.server_key = server_key

    @classmethod
    def from_password(
        cls, password: str, salt: bytes | None = None, iterations: int = DEFAULT_ITERATIONS
    ) -> ScramCredential:
        """Derive the stored form of ``password`` (random 16-byte salt unless given)."""
        salt = os.urandom(16) if salt is None else salt
        salted = hashlib.pbkdf2_hmac("sha256", password.encode("utf-8"), salt, iterations)
        client_key = _hmac(salted, b"Client Key")
        return cls(iterations, salt, _h(client_key), _hmac(salted, b"Server Key"))

    def line(self, username: str) -> str:
        """The credentials-file line of this credential."""
        return ":".join(
            (username, str(self.iterations), _b64(self.salt), _b64(self.stored_key), _b64(self.server_key))
        )


def parse_credentials(text: str, source: str = "<credentials>") -> dict[str, ScramCredential]:
    """Parse a credentials file: ``user:iterations:salt:stored_key:server_key`` lines, ``#`` comments."""
    out: dict[str, ScramCredential] = {}
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.rsplit(":", 4)  # the user name may contain ':'; the other fields cannot
        try:
            if len(parts) != 5 or not parts[0]:
                raise ValueError("want user:iterations:salt:stored_key:server_key")
            cred = ScramCredential(int(parts[1]), _unb64(parts[2]), _unb64(parts[3]), _unb64(parts[4]))
            if cred.iterations < 1 or len(cred.stored_key) != 32 or len(cred.server_key) != 32:
                raise ValueError("iterations must be positive and keys 32 bytes")
        except ValueError as exc:
            raise ConfigError(
                "auth.enhanced.credentials_file",
                "user:iterations:salt:stored_key:server_key lines",
                source,
                lineno,
                problem=f"bad SCRAM credential line: {exc}",
            ) from None
        out[parts[0]] = cred
    return out


def _saslname(name: str) -> str | None:
    """Decode a SCRAM saslname (``=2C`` is ',', ``=3D`` is '='); None if it is ill-formed."""
    out = []
    i = 0
    while i < len(name):
        ch = name[i]
        if ch == "=":
            code = name[i + 1 : i + 3]
            if code == "2C":
                out.append(",")
            elif code == "3D":
                out.append("=")
            else:
                return None
            i += 3
        elif ch == ",":
            return None
        else:
            out.append(ch)
            i += 1
    return "".join(out)


def _attributes(message: str) -> dict[str, str]:
    """``a=1,b=2`` -> {"a": "1", "b": "2"}; a part without ``=`` raises ValueError."""
    attrs = {}
    for part in message.split(","):
        key, sep, value = part.partition("=")
        if not sep or len(key) != 1:
            raise ValueError(part)
        attrs.setdefault(key, value)
    return attrs


class _ScramExchange:
    """The server side of one SCRAM-SHA-256 exchange: client-first, then client-final."""

    __slots__ = (
        "_auth",
        "_expect_user",
        "_state",
        "_user",
        "_cred",
        "_known",
        "_nonce",
        "_gs2",
        "_first_bare",
        "_server_first",
    )

    def __init__(self, auth: ScramSha256Authenticator, expect_user: str | None) -> None:
        self._auth = auth
        self._expect_user = expect_user
        self._state = 0

    def step(self, data: bytes | None) -> AuthStep:
        state = self._state
        self._state += 1
        try:
            text = (data or b"").decode("utf-8")
        except UnicodeDecodeError:
            return AuthStep.failure("SCRAM message is not UTF-8")
        if state == 0:
            return self._client_first(text)
        if state == 1:
            return self._client_final(text)
        return AuthStep.failure("SCRAM exchange already complete")

    def _client_first(self, text: str) -> AuthStep:
        # gs2-header: "n,," (no channel binding) or "y,," (client supports it, we do not offer it).
        if not (text.startswith("n,") or text.startswith("y,")):
            return AuthStep.failure("SCRAM channel binding is not supported")
        cb, _, rest = text.partition(",")
        authzid, _, bare = rest.partition(",")
        if authzid:
            return AuthStep.failure("SCRAM authorization identity is not supported")
        try:
            attrs = _attributes(bare)
        except ValueError:
            return AuthStep.failure("malformed SCRAM client-first message")
        if "m" in attrs or "n" not in attrs or not attrs.get("r"):
            return AuthStep.failure("malformed SCRAM client-first message")
        user = _saslname(attrs["n"])
        if not user:
            return AuthStep.failure("malformed SCRAM user name")
        if self._expect_user is not None and user != self._expect_user:
            return AuthStep.failure(
                "SCRAM user differs from the connection's user", BAD_USER_NAME_OR_PASSWORD
            )
        cred = self._auth.lookup(user)
        # An unknown user goes through the same exchange with a made-up credential and fails at the
        # end, so a client cannot tell which names exist.
        self._known = cred is not None
        if cred is None:
            cred = self._auth.decoy(user)
        self._user = user
        self._cred = cred
        self._gs2 = f"{cb},,"
        self._nonce = attrs["r"] + self._auth.server_nonce()
        self._first_bare = bare
        self._server_first = f"r={self._nonce},s={_b64(cred.salt)},i={cred.iterations}"
        return AuthStep.proceed(self._server_first.encode())

    def _client_final(self, text: str) -> AuthStep:
        without_proof, sep, proof_b64 = text.rpartition(",p=")
        if not sep:
            return AuthStep.failure("malformed SCRAM client-final message")
        try:
            attrs = _attributes(without_proof)
            proof = _unb64(proof_b64)
            binding = _unb64(attrs.get("c", ""))
        except ValueError:
            return AuthStep.failure("malformed SCRAM client-final message")
        if binding != self._gs2.encode() or attrs.get("r") != self._nonce:
            return AuthStep.failure("SCRAM channel binding or nonce mismatch")
        cred = self._cred
        auth_message = f"{self._first_bare},{self._server_first},{without_proof}".encode()
        signature = _hmac(cred.stored_key, auth_message)
        if len(proof) != len(signature):
            return AuthStep.failure("bad SCRAM proof", BAD_USER_NAME_OR_PASSWORD)
        client_key = bytes(a ^ b for a, b in zip(proof, signature, strict=True))
        if not (hmac.compare_digest(_h(client_key), cred.stored_key) and self._known):
            return AuthStep.failure("SCRAM authentication failed", BAD_USER_NAME_OR_PASSWORD)
        server_signature = _hmac(cred.server_key, auth_message)
        return AuthStep.success(self._user, f"v={_b64(server_signature)}".encode())


class ScramSha256Authenticator:
    """SCRAM-SHA-256 over MQTT 5.0 enhanced authentication.

    ``credentials`` maps user names to ``ScramCredential``; it is read on every exchange, so a
    caller may update it in place (a reload).
    """

    method = SCRAM_SHA_256

    def __init__(
        self,
        credentials: Mapping[str, ScramCredential] | Callable[[str], ScramCredential | None],
        server_nonce: Callable[[], str] | None = None,
    ) -> None:
        self._credentials = credentials
        self._decoy_key = os.urandom(32)
        # The server's part of the nonce; injectable so the RFC 7677 test vector can be replayed.
        self.server_nonce = server_nonce or (lambda: _b64(secrets.token_bytes(18)))

    @classmethod
    def from_file(cls, path: str) -> ScramSha256Authenticator:
        """Load the credentials file ``path`` (see ``parse_credentials``)."""
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except OSError as exc:
            raise ConfigError(
                "auth.enhanced.credentials_file",
                "a readable SCRAM credentials file",
                path,
                problem=f"cannot read {path}: {exc.strerror}",
            ) from None
        return cls(parse_credentials(text, path))

    def lookup(self, username: str) -> ScramCredential | None:
        creds = self._credentials
        if callable(creds):
            return creds(username)
        return creds.get(username)

    def decoy(self, username: str) -> ScramCredential:
        """A stable made-up credential for an unknown user (same salt every time for that name)."""
        salt = _hmac(self._decoy_key, username.encode())[:16]
        return ScramCredential(DEFAULT_ITERATIONS, salt, os.urandom(32), os.urandom(32))

    def start(self, client_id: str, username: str | None) -> AuthExchange:
        return _ScramExchange(self, username)


class ScramClient:
    """The client side of SCRAM-SHA-256: ``first()``, ``final(server_first)``, ``verify(server_final)``."""

    def __init__(self, username: str, password: str, nonce: str | None = None) -> None:
        self.username = username
        self.password = password
        self.nonce = nonce or _b64(secrets.token_bytes(18))
        self._first_bare = "n=" + username.replace("=", "=3D").replace(",", "=2C") + ",r=" + self.nonce
        self._server_signature = b""

    def first(self) -> bytes:
        """client-first-message (no channel binding)."""
        return ("n,," + self._first_bare).encode()

    def final(self, server_first: bytes) -> bytes:
        """client-final-message for the server's challenge; ValueError if the challenge is bad."""
        text = server_first.decode()
        attrs = _attributes(text)
        nonce = attrs["r"]
        if not nonce.startswith(self.nonce):
            raise ValueError("server nonce does not extend the client nonce")
        salted = hashlib.pbkdf2_hmac("sha256", self.password.encode(), _unb64(attrs["s"]), int(attrs["i"]))
        client_key = _hmac(salted, b"Client Key")
        without_proof = f"c={_b64(b'n,,')},r={nonce}"
        auth_message = f"{self._first_bare},{text},{without_proof}".encode()
        signature = _hmac(_h(client_key), auth_message)
        proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
        self._server_signature = _hmac(_hmac(salted, b"Server Key"), auth_message)
        return f"{without_proof},p={_b64(proof)}".encode()

    def verify(self, server_final: bytes) -> bool:
        """True when the server proved it knows the credential too."""
        attrs = _attributes(server_final.decode())
        return hmac.compare_digest(_unb64(attrs.get("v", "")), self._server_signature)


def authenticators_from_config(method: str, credentials_file: str) -> dict[str, Authenticator]:
    """The authenticators the ``auth.enhanced`` keys configure: Authentication Method -> Authenticator."""
    if not method:
        return {}
    if method == SCRAM_SHA_256:
        if not credentials_file:
            raise ConfigError(
                "auth.enhanced.credentials_file",
                "a SCRAM credentials file when auth.enhanced.method is SCRAM-SHA-256",
                got=credentials_file,
            )
        return {method: ScramSha256Authenticator.from_file(credentials_file)}
    raise ConfigError("auth.enhanced.method", 'SCRAM-SHA-256 or ""', got=method)


def main(argv: list[str] | None = None) -> int:
    """``python -m fluxmq.broker.auth_enhanced USER [ITERATIONS]``: read a password from stdin, print
    the SCRAM-SHA-256 credentials line for ``auth.enhanced.credentials_file``."""
    args = sys.argv[1:] if argv is None else argv
    if not 1 <= len(args) <= 2:
        sys.stderr.write("usage: python -m fluxmq.broker.auth_enhanced USER [ITERATIONS] < password\n")
        return 2
    password = sys.stdin.readline().rstrip("\r\n")
    iterations = int(args[1]) if len(args) == 2 else DEFAULT_ITERATIONS
    sys.stdout.write(ScramCredential.from_password(password, iterations=iterations).line(args[0]) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
