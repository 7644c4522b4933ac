"""A sans-IO RFC 7252 (CoAP) message codec: bytes in, ``CoapMessage`` out, and back.

Nothing here touches a socket or a clock. ``parse`` raises ``MalformedDatagram`` (from
``fluxmq.errors``) for every datagram that is not a well-formed CoAP message, and never anything
else; the server counts and drops those (RFC 7252 §4.2: a malformed CON is answered with RST).

Also here: option numbers and their critical/elective rule (§5.4.1: odd numbers are critical),
unsigned-integer option values (§3.2), the Block1/Block2 option value (RFC 7959 §2.2), the Observe
option (RFC 7641) and the Content-Format registry entries the bridge maps to MQTT 5.0 content types.
"""

from __future__ import annotations

from fluxmq.errors import MalformedDatagram

VERSION = 1

# message types (§3)
CON = 0
NON = 1
ACK = 2
RST = 3
TYPE_NAMES = ("CON", "NON", "ACK", "RST")


def code(cls: int, detail: int) -> int:
    """A code ``c.dd`` as its byte (``code(2, 5)`` is 2.05 Content)."""
    return (cls << 5) | detail


def code_text(value: int) -> str:
    """``69`` -> ``"2.05"``."""
    return f"{value >> 5}.{value & 31:02d}"


EMPTY = 0
GET = code(0, 1)
POST = code(0, 2)
PUT = code(0, 3)
DELETE = code(0, 4)
CREATED = code(2, 1)
DELETED = code(2, 2)
VALID = code(2, 3)
CHANGED = code(2, 4)
CONTENT = code(2, 5)
CONTINUE = code(2, 31)  # RFC 7959
BAD_REQUEST = code(4, 0)
UNAUTHORIZED = code(4, 1)
BAD_OPTION = code(4, 2)
FORBIDDEN = code(4, 3)
NOT_FOUND = code(4, 4)
METHOD_NOT_ALLOWED = code(4, 5)
REQUEST_ENTITY_INCOMPLETE = code(4, 8)  # RFC 7959
REQUEST_ENTITY_TOO_LARGE = code(4, 13)
UNSUPPORTED_CONTENT_FORMAT = code(4, 15)
TOO_MANY_REQUESTS = code(4, 29)  # RFC 8516
INTERNAL_SERVER_ERROR = code(5, 0)
SERVICE_UNAVAILABLE = code(5, 3)

# option numbers (§5.10, RFC 7641, RFC 7959)
IF_MATCH = 1
URI_HOST = 3
ETAG = 4
IF_NONE_MATCH = 5
OBSERVE = 6
URI_PORT = 7
LOCATION_PATH = 8
URI_PATH = 11
CONTENT_FORMAT = 12
MAX_AGE = 14
URI_QUERY = 15
ACCEPT = 17
LOCATION_QUERY = 20
BLOCK2 = 23
BLOCK1 = 27
SIZE2 = 28
PROXY_URI = 35
PROXY_SCHEME = 39
SIZE1 = 60
NO_RESPONSE = 258  # RFC 7967 (elective)
# An elective option from the experimental range (§12.2: 65000-65535) carrying the MQTT topic of a
# notification, so an observer of a filter knows which topic each notification came from.
TOPIC = 65000

# What this server understands; an unknown critical option in a request gets 4.02 (§5.4.1).
KNOWN_OPTIONS = frozenset(
    {
        IF_MATCH,
        URI_HOST,
        ETAG,
        IF_NONE_MATCH,
        OBSERVE,
        URI_PORT,
        LOCATION_PATH,
        URI_PATH,
        CONTENT_FORMAT,
        MAX_AGE,
        URI_QUERY,
        ACCEPT,
        LOCATION_QUERY,
        BLOCK2,
        BLOCK1,
        SIZE2,
        SIZE1,
        NO_RESPONSE,
        TOPIC,
    }
)

# Content-Format registry entries (§12.3 and later registrations) <-> MQTT 5.0 Content Type strings.
CONTENT_FORMATS: dict[int, str] = {
    0: "text/plain;charset=utf-8",
    40: "application/link-format",
    41: "application/xml",
    42: "application/octet-stream",
    47: "application/exi",
    50: "application/json",
    60: "application/cbor",
    110: "application/senml+json",
    112: "application/senml+cbor",
}
CONTENT_TYPES: dict[str, int] = {v: k for k, v in CONTENT_FORMATS.items()}
CONTENT_TYPES["text/plain"] = 0

_PAYLOAD_MARKER = 0xFF


def is_critical(number: int) -> bool:
    """§5.4.1: an option is critical when its number is odd."""
    return bool(number & 1)


class CoapMessage:
    """One CoAP message. ``options`` is a list of ``(number, value bytes)`` in wire order (sorted
    by number; repeated options keep their order)."""

    __slots__ = ("mtype", "code", "mid", "token", "options", "payload")

    def __init__(
        self,
        mtype: int,
        code: int,
        mid: int,
        token: bytes = b"",
        options: list[tuple[int, bytes]] | None = None,
        payload: bytes = b"",
    ) -> None:
        self.mtype = mtype
        self.code = code
        self.mid = mid
        self.token = token
        self.options = options if options is not None else []
        self.payload = payload

    def __repr__(self) -> str:
        return (
            f"CoapMessage({TYPE_NAMES[self.mtype]}, {code_text(self.code)}, mid={self.mid}, "
            f"token={self.token.hex()}, options={self.options}, payload={len(self.payload)}B)"
        )

    @property
    def is_request(self) -> bool:
        return 1 <= self.code <= 31

    def option(self, number: int) -> bytes | None:
        """The first value of option ``number``, or None."""
        for n, value in self.options:
            if n == number:
                return value
        return None

    def option_values(self, number: int) -> list[bytes]:
        return [value for n, value in self.options if n == number]

    def uint_option(self, number: int) -> int | None:
        value = self.option(number)
        return None if value is None else decode_uint(value)

    def add(self, number: int, value: bytes) -> CoapMessage:
        """Append an option (serialize sorts them); returns self."""
        self.options.append((number, value))
        return self

    def add_uint(self, number: int, value: int) -> CoapMessage:
        return self.add(number, encode_uint(value))

    def unknown_critical(self) -> int | None:
        """The number of the first critical option this server does not know, or None."""
        for n, _ in self.options:
            if n & 1 and n not in KNOWN_OPTIONS:
                return n
        return None

    def uri_path(self) -> list[str]:
        """The Uri-Path segments as text; ``MalformedDatagram`` when one is not UTF-8."""
        return [_text(v) for v in self.option_values(URI_PATH)]

    def uri_query(self) -> list[str]:
        return [_text(v) for v in self.option_values(URI_QUERY)]


def _text(value: bytes) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedDatagram("an option string is not valid UTF-8") from None


def encode_uint(value: int) -> bytes:
    """§3.2 uint: big-endian, minimal length (0 is the empty string)."""
    if value < 0:
        raise ValueError("uint options are unsigned")
    return value.to_bytes((value.bit_length() + 7) // 8, "big")


def decode_uint(value: bytes) -> int:
    return int.from_bytes(value, "big")


def encode_block(num: int, more: bool, szx: int) -> bytes:
    """RFC 7959 §2.2 Block1/Block2 value: NUM (up to 20 bits), M, SZX (block size 2**(szx+4))."""
    if not 0 <= szx <= 6:
        raise ValueError("SZX is 0..6")
    return encode_uint((num << 4) | (8 if more else 0) | szx)


def decode_block(value: bytes) -> tuple[int, bool, int]:
    """``(num, more, szx)``; ``MalformedDatagram`` for a value longer than 3 bytes or SZX 7."""
    if len(value) > 3:
        raise MalformedDatagram("a Block option longer than 3 bytes")
    raw = decode_uint(value)
    szx = raw & 7
    if szx == 7:
        raise MalformedDatagram("Block SZX 7 is reserved")
    return raw >> 4, bool(raw & 8), szx


def block_size(szx: int) -> int:
    return 1 << (szx + 4)


def _extended(nibble: int, data, pos: int, n: int, what: str) -> tuple[int, int]:
    """An option delta or length nibble of 13 or 14 with its 1- or 2-byte extension (RFC 7252
    3.1); returns the value and the position after the extension."""
    if nibble == 13:
        if pos >= n:
            raise MalformedDatagram(f"truncated option {what}")
        return data[pos] + 13, pos + 1
    if pos + 2 > n:
        raise MalformedDatagram(f"truncated option {what}")
    return ((data[pos] << 8) | data[pos + 1]) + 269, pos + 2


def parse(data: bytes) -> CoapMessage:
    """One datagram -> ``CoapMessage``; ``MalformedDatagram`` for anything not well formed (§3)."""
    n = len(data)
    if n < 4:
        raise MalformedDatagram("shorter than the 4-byte header")
    first = data[0]
    if first >> 6 != VERSION:
        raise MalformedDatagram(f"unknown version {first >> 6}")
    mtype = (first >> 4) & 3
    tkl = first & 15
    if tkl > 8:
        raise MalformedDatagram("token length 9-15 is reserved")
    msg_code = data[1]
    mid = (data[2] << 8) | data[3]
    pos = 4 + tkl
    if pos > n:
        raise MalformedDatagram("truncated token")
    token = bytes(data[4:pos])
    options: list[tuple[int, bytes]] = []
    number = 0
    payload = b""
    while pos < n:
        byte = data[pos]
        pos += 1
        if byte == _PAYLOAD_MARKER:
            if pos == n:
                raise MalformedDatagram("payload marker with an empty payload")
            payload = bytes(data[pos:])
            break
        delta = byte >> 4
        length = byte & 15
        if delta == 15 or length == 15:
            raise MalformedDatagram("option nibble 15 outside the payload marker")
        if delta >= 13:
            delta, pos = _extended(delta, data, pos, n, "delta")
        if length >= 13:
            length, pos = _extended(length, data, pos, n, "length")
        number += delta
        if number > 0xFFFF:
            raise MalformedDatagram("option number over 65535")
        end = pos + length
        if end > n:
            raise MalformedDatagram("truncated option value")
        options.append((number, bytes(data[pos:end])))
        pos = end
    if msg_code == EMPTY and (tkl or options or payload):
        raise MalformedDatagram("an Empty message (code 0.00) with a token, options or payload")  # §4.1
    if (msg_code >> 5) in (1, 6, 7):
        raise MalformedDatagram(f"reserved code class {msg_code >> 5}")
    return CoapMessage(mtype, msg_code, mid, token, options, payload)


def _nibble(value: int, out: bytearray) -> int:
    if value < 13:
        return value
    if value < 269:
        out.append(value - 13)
        return 13
    value -= 269
    out += value.to_bytes(2, "big")
    return 14


def serialize(msg: CoapMessage) -> bytes:
    """``CoapMessage`` -> datagram bytes (options sorted by number, a stable sort)."""
    token = msg.token
    if len(token) > 8:
        raise ValueError("a token is at most 8 bytes")
    out = bytearray(
        (VERSION << 6 | msg.mtype << 4 | len(token), msg.code, msg.mid >> 8 & 0xFF, msg.mid & 0xFF)
    )
    out += token
    previous = 0
    options = msg.options
    if any(options[i][0] > options[i + 1][0] for i in range(len(options) - 1)):
        options = sorted(options, key=lambda o: o[0])
    for number, value in options:
        ext = bytearray()
        delta = _nibble(number - previous, ext)
        ext_len = bytearray()
        length = _nibble(len(value), ext_len)
        out.append(delta << 4 | length)
        out += ext
        out += ext_len
        out += value
        previous = number
    if msg.payload:
        out.append(_PAYLOAD_MARKER)
        out += msg.payload
    return bytes(out)


def empty(mtype: int, mid: int) -> bytes:
    """An Empty ACK or RST (§4.2, §4.3): the 4-byte header alone."""
    return bytes((VERSION << 6 | mtype << 4, EMPTY, mid >> 8 & 0xFF, mid & 0xFF))
