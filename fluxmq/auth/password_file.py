"""Mosquitto password files: read, verify, write; and the ``fluxmq-passwd`` command.

A line is ``username:hash``; blank lines and lines starting with ``#`` are skipped. The hashes are
the two ``mosquitto_passwd`` writes (salt and hash in standard base64)::

    $6$<salt>$<sha512(password + salt)>                          (Mosquitto 1.x, -H sha512)
    $7$<iterations>$<salt>$<pbkdf2_hmac_sha512(password, salt)>  (Mosquitto 2.x default, 101 iterations)

Passwords are compared as the bytes the client sent (an MQTT password is binary), in constant time;
an unknown user costs the same hashing as a known one, so timing does not reveal which names exist.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import getpass
import hashlib
import hmac
import os
import sys
import tempfile
from collections.abc import Iterator

from fluxmq.config.files import read_text
from fluxmq.errors import ConfigError

SHA512 = "sha512"
SHA512_PBKDF2 = "sha512-pbkdf2"
DEFAULT_ITERATIONS = 101  # what mosquitto_passwd 2.0 writes
SALT_BYTES = 12  # mosquitto_passwd's salt length
CONFIG_KEY = "auth.password_file"


def _b64decode(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"), validate=True)


class PasswordHash:
    """One parsed ``$6$`` or ``$7$`` hash."""

    __slots__ = ("algorithm", "iterations", "salt", "digest")

    def __init__(self, algorithm: str, iterations: int, salt: bytes, digest: bytes) -> None:
        self.algorithm = algorithm
        self.iterations = iterations
        self.salt = salt
        self.digest = digest

    @classmethod
    def parse(cls, text: str) -> PasswordHash:
        """Parse ``$6$salt$hash`` or ``$7$iterations$salt$hash``; ``ValueError`` says what is wrong."""
        parts = text.split("$")
        try:
            if len(parts) == 4 and parts[0] == "" and parts[1] == "6":
                return cls(SHA512, 1, _b64decode(parts[2]), _b64decode(parts[3]))
            if len(parts) == 5 and parts[0] == "" and parts[1] == "7":
                if not (parts[2].isascii() and parts[2].isdigit()) or int(parts[2]) < 1:
                    raise ValueError(f"bad iteration count {parts[2]!r}")
                return cls(SHA512_PBKDF2, int(parts[2]), _b64decode(parts[3]), _b64decode(parts[4]))
        except (binascii.Error, UnicodeEncodeError):
            raise ValueError("salt or hash is not valid base64") from None
        raise ValueError("not a $6$ or $7$ password hash (mosquitto_passwd writes them)")

    def compute(self, password: bytes) -> bytes:
        """The digest ``password`` gives with this hash's algorithm, salt and iterations."""
        if self.algorithm == SHA512:
            return hashlib.sha512(password + self.salt).digest()
        return hashlib.pbkdf2_hmac("sha512", password, self.salt, self.iterations, len(self.digest) or 64)

    def verify(self, password: bytes) -> bool:
        return hmac.compare_digest(self.compute(password), self.digest)

    def encode(self) -> str:
        salt = base64.b64encode(self.salt).decode("ascii")
        digest = base64.b64encode(self.digest).decode("ascii")
        if self.algorithm == SHA512:
            return f"$6${salt}${digest}"
        return f"$7${self.iterations}${salt}${digest}"


def hash_password(
    password: bytes | str,
    algorithm: str = SHA512_PBKDF2,
    iterations: int = DEFAULT_ITERATIONS,
    salt: bytes | None = None,
) -> str:
    """A hash string as ``mosquitto_passwd`` writes it (``-H sha512`` or ``-H sha512-pbkdf2``)."""
    if isinstance(password, str):
        password = password.encode("utf-8")
    if algorithm not in (SHA512, SHA512_PBKDF2):
        raise ValueError(f"unknown hash algorithm {algorithm!r} (sha512 or sha512-pbkdf2)")
    if iterations < 1:
        raise ValueError("iterations must be at least 1")
    salt = os.urandom(SALT_BYTES) if salt is None else salt
    h = PasswordHash(algorithm, iterations if algorithm == SHA512_PBKDF2 else 1, salt, b"")
    h.digest = h.compute(password)
    return h.encode()


# An unknown user is checked against this, so it costs what a real $7$ check costs.
_DECOY = PasswordHash(SHA512_PBKDF2, DEFAULT_ITERATIONS, os.urandom(SALT_BYTES), os.urandom(64))


class PasswordFile:
    """The users of one password file, in file order; comments and blank lines are kept for writing.

    ``parse``/``load`` are strict by default (every hash must be ``$6$`` or ``$7$``); ``strict=False``
    keeps other values as they are, which ``fluxmq-passwd -U`` needs to hash plain-text files.
    """

    def __init__(self, source: str = "") -> None:
        self.source = source
        self._lines: list[tuple[str, str]] = []  # ("user", name) or ("raw", text) in file order
        self._hashes: dict[str, str] = {}  # user -> hash text as written
        self._parsed: dict[str, PasswordHash] = {}

    @classmethod
    def parse(cls, text: str, source: str = "", strict: bool = True) -> PasswordFile:
        """Parse file contents; ``ConfigError`` naming ``source`` and the line when one is invalid."""
        pf = cls(source)
        for number, line in enumerate(text.splitlines(), 1):
            stripped = line.strip()
            if not stripped or stripped.startswith("#"):
                pf._lines.append(("raw", line))
                continue
            user, sep, value = line.rstrip("\r\n").partition(":")
            if not sep or not user:
                raise ConfigError(
                    CONFIG_KEY,
                    "username:hash lines",
                    source,
                    number,
                    problem="expected username:hash (as mosquitto_passwd writes)",
                )
            if strict:
                try:
                    pf._parsed[user] = PasswordHash.parse(value)
                except ValueError as exc:
                    raise ConfigError(
                        CONFIG_KEY, "a $6$ or $7$ hash", source, number, problem=f"user {user!r}: {exc}"
                    ) from None
            if user not in pf._hashes:
                pf._lines.append(("user", user))
            pf._hashes[user] = value
        return pf

    @classmethod
    def load(cls, path: str, strict: bool = True) -> PasswordFile:
        """Read ``path``; ``ConfigError`` when it cannot be read or a line is invalid."""
        return cls.parse(read_text(CONFIG_KEY, "a readable password file", path), path, strict)

    # -- checks ------------------------------------------------------------------------------------

    def verify(self, username: str, password: bytes | None) -> bool:
        """True when ``username`` is in the file and ``password`` matches its hash."""
        h = self._parsed.get(username)
        if h is None:
            if username in self._hashes:  # parsed non-strictly: make it strict now
                try:
                    h = self._parsed[username] = PasswordHash.parse(self._hashes[username])
                except ValueError:
                    h = None
            if h is None:
                _DECOY.verify(password or b"")
                return False
        if password is None:
            h.compute(b"")
            return False
        return h.verify(password)

    def iterations(self, username: str) -> int:
        """Hash iterations of ``username`` (1 for $6$, 0 when unknown): the cost of one check."""
        h = self._parsed.get(username)
        return h.iterations if h is not None else 0

    def __contains__(self, username: object) -> bool:
        return username in self._hashes

    def __len__(self) -> int:
        return len(self._hashes)

    def users(self) -> Iterator[str]:
        return iter(self._hashes)

    def hash_of(self, username: str) -> str | None:
        return self._hashes.get(username)

    # -- changes -----------------------------------------------------------------------------------

    def set(
        self,
        username: str,
        password: bytes | str,
        algorithm: str = SHA512_PBKDF2,
        iterations: int = DEFAULT_ITERATIONS,
    ) -> None:
        """Add ``username`` or replace its password (a new salt every time)."""
        check_username(username)
        value = hash_password(password, algorithm, iterations)
        if username not in self._hashes:
            self._lines.append(("user", username))
        self._hashes[username] = value
        self._parsed[username] = PasswordHash.parse(value)

    def delete(self, username: str) -> bool:
        if username not in self._hashes:
            return False
        del self._hashes[username]
        self._parsed.pop(username, None)
        self._lines.remove(("user", username))
        return True

    def hash_plain(self, algorithm: str = SHA512_PBKDF2, iterations: int = DEFAULT_ITERATIONS) -> int:
        """Hash every value that is not a ``$6$``/``$7$`` hash yet (a plain-text file); returns how many."""
        n = 0
        for user, value in list(self._hashes.items()):
            try:
                PasswordHash.parse(value)
            except ValueError:
                self.set(user, value, algorithm, iterations)
                n += 1
        return n

    def dumps(self) -> str:
        out = []
        for kind, value in self._lines:
            out.append(value if kind == "raw" else f"{value}:{self._hashes[value]}")
        return "".join(line + "\n" for line in out)

    def save(self, path: str) -> None:
        """Write the file atomically (a temporary file in the same directory, then rename), mode 0600."""
        directory = os.path.dirname(os.path.abspath(path))
        fd, tmp = tempfile.mkstemp(prefix=".fluxmq-passwd-", dir=directory)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(self.dumps())
            os.chmod(tmp, 0o600)
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise


def check_username(username: str) -> None:
    """``ValueError`` for a name a password file cannot hold (empty, ``:``, a line break)."""
    if not username:
        raise ValueError("empty username")
    if ":" in username:
        raise ValueError("username must not contain the ':' character")
    if "\n" in username or "\r" in username:
        raise ValueError("username must not contain a line break")


# -- fluxmq-passwd ---------------------------------------------------------------------------------

USAGE = """\
fluxmq-passwd manages password files for fluxmq (auth.password_file), in mosquitto_passwd's format.

Usage: fluxmq-passwd [-H sha512 | -H sha512-pbkdf2] [-I iterations] [-c | -D] passwordfile username
       fluxmq-passwd [-H sha512 | -H sha512-pbkdf2] [-I iterations] [-c] -b passwordfile username password
       fluxmq-passwd -U passwordfile
 -b : run in batch mode to allow passing passwords on the command line.
 -c : create a new password file. This will overwrite existing files.
 -D : delete the username rather than adding/updating its password.
 -H : specify the hashing algorithm. Defaults to sha512-pbkdf2, which is recommended.
 -I : PBKDF2 iterations for sha512-pbkdf2 (default 101, as mosquitto_passwd).
 -U : update a plain text password file to use hashed passwords.
"""


def _parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fluxmq-passwd", add_help=False, usage=argparse.SUPPRESS)
    parser.add_argument("-b", dest="batch", action="store_true")
    parser.add_argument("-c", dest="create", action="store_true")
    parser.add_argument("-D", dest="delete", action="store_true")
    parser.add_argument("-U", dest="update", action="store_true")
    parser.add_argument("-H", dest="algorithm", default=SHA512_PBKDF2, choices=(SHA512, SHA512_PBKDF2))
    parser.add_argument("-I", dest="iterations", type=int, default=DEFAULT_ITERATIONS)
    parser.add_argument("-h", "--help", dest="help", action="store_true")
    parser.add_argument("args", nargs="*")
    return parser.parse_args(argv)


def _read_password() -> str:
    """Prompt twice without echo, as mosquitto_passwd does."""
    first = getpass.getpass("Password: ")
    if not first:
        raise ValueError("Empty password.")
    second = getpass.getpass("Reenter password: ")
    if first != second:
        raise ValueError("Passwords do not match.")
    return first


def main(argv: list[str] | None = None) -> int:
    """``fluxmq-passwd``: add, change or delete users of a password file (mosquitto_passwd compatible)."""
    args_in = sys.argv[1:] if argv is None else argv
    try:
        args = _parse_args(args_in)
    except SystemExit:
        sys.stderr.write(USAGE)
        return 1
    rest = args.args
    if args.help or not args_in:
        sys.stdout.write(USAGE)
        return 0 if args.help else 1
    try:
        if args.iterations < 1:
            raise ValueError("-I iterations must be at least 1.")
        if args.update:
            if args.create or args.delete or args.batch or len(rest) != 1:
                raise ValueError("-U takes only a password file.")
            pf = PasswordFile.load(rest[0], strict=False)
            pf.hash_plain(args.algorithm, args.iterations)
            pf.save(rest[0])
            return 0
        if args.create and args.delete:
            raise ValueError("-c and -D cannot be used together.")
        if args.delete and args.batch:
            raise ValueError("-D and -b cannot be used together.")
        want = 3 if args.batch else 2
        if len(rest) != want:
            missing = "password file, username or password" if args.batch else "password file or username"
            raise ValueError(f"{missing} missing.")
        path, username = rest[0], rest[1]
        check_username(username)
        if args.create:
            pf = PasswordFile(path)
        else:
            if not os.path.exists(path):
                raise ValueError(
                    f"Unable to open password file {path}: it does not exist (use -c to create it)."
                )
            pf = PasswordFile.load(path, strict=False)
        if args.delete:
            if not pf.delete(username):
                sys.stderr.write(f"Warning: User {username} not found in password file.\n")
        else:
            password = rest[2] if args.batch else _read_password()
            if not password:
                raise ValueError("Empty password.")
            pf.set(username, password, args.algorithm, args.iterations)
        pf.save(path)
        return 0
    except (ValueError, ConfigError) as exc:
        sys.stderr.write(f"Error: {exc}\n")
        return 1
    except OSError as exc:
        sys.stderr.write(f"Error: {exc.filename or ''}: {exc.strerror}\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
