"""Logging setup: key=value text or JSON lines, size rotation with gzip, per-logger throttling.

The idiom at call sites (one logger per module, a child of ``fluxmq``)::

    log = logging.getLogger(__name__)
    log.info("connect", extra={"client_id": cid, "peer": peer})

The message is the event name and ``extra`` carries the fields. Text output::

    2026-11-22T03:04:05.123Z INFO fluxmq.broker event=connect client_id=abc peer=127.0.0.1:5555

JSON output: ``{"ts": ..., "level": "INFO", "logger": ..., "msg": "connect", "client_id": ...}``.

Cost when the level is disabled: ``Logger.info`` returns at ``isEnabledFor`` before any record or
formatting, so only the ``extra`` dict is built; on hot paths guard with
``if log.isEnabledFor(logging.DEBUG):``. Field names must not be LogRecord attributes (``name``,
``msg``, ``args``, ``message``, ``levelname``, ...): the standard library raises ``KeyError`` for
those. For context that every line of a connection carries, ``bind(log, client_id=..., peer=...)``
returns an adapter that merges it into each call's ``extra``.

``setup_logging(cfg.log)`` configures the ``fluxmq`` logger (level, format, stderr or a rotating
file, throttling) and stops it propagating to the root logger, so nothing is written twice.
"""

from __future__ import annotations

import gzip
import json
import logging
import logging.handlers
import os
import re
import shutil
import stat
import sys
import threading
import time
from collections.abc import Callable, Mapping, MutableMapping
from typing import Any, TextIO

from fluxmq.errors import ConfigError

__all__ = [
    "LEVELS",
    "TRACE",
    "BatchedStream",
    "BoundLogger",
    "JsonFormatter",
    "RotatingFile",
    "TextFormatter",
    "ThrottlingHandler",
    "bind",
    "effective_level",
    "fields_of",
    "format_fields",
    "setup_logging",
]

ROOT_LOGGER = "fluxmq"

# Below DEBUG: per-packet detail (reference 004's "trace", forced by log.trace or FLUXMQ_TRACE=true).
TRACE = 5
logging.addLevelName(TRACE, "TRACE")

LEVELS = {
    "trace": TRACE,
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warn": logging.WARNING,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}

# Attributes every LogRecord has; anything else on a record came from ``extra``.
_RECORD_ATTRS = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message",
    "asctime",
    "taskName",
}
_NEEDS_QUOTES = re.compile(r'[\s"=\\]|[\x00-\x1f\x7f]')
_JSON_CORE = ("ts", "level", "logger", "msg")


def fields_of(record: logging.LogRecord) -> dict[str, Any]:
    """The structured fields of a record: the attributes its ``extra`` added, in order."""
    return {k: v for k, v in record.__dict__.items() if k not in _RECORD_ATTRS}


def _text_value(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    text = value if isinstance(value, str) else str(value)
    if text and not _NEEDS_QUOTES.search(text):
        return text
    return json.dumps(text, ensure_ascii=False)


def format_fields(fields: Mapping[str, object]) -> str:
    """``k=v k2="v 2"``: values with spaces, quotes, ``=`` or control characters are JSON-quoted."""
    return " ".join(f"{k}={_text_value(v)}" for k, v in fields.items())


def _utc_timestamp(record: logging.LogRecord) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"


class TextFormatter(logging.Formatter):
    """``TIMESTAMP LEVEL LOGGER event=MSG k=v ...``; a traceback follows on the next lines."""

    def format(self, record: logging.LogRecord) -> str:
        line = f"{_utc_timestamp(record)} {record.levelname} {record.name} event={_text_value(record.getMessage())}"
        fields = fields_of(record)
        if fields:
            line = f"{line} {format_fields(fields)}"
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line = f"{line}\n{record.exc_text}"
        if record.stack_info:
            line = f"{line}\n{self.formatStack(record.stack_info)}"
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``ts``, ``level``, ``logger``, ``msg``, then the fields.

    A field named like a core key is written with a trailing underscore (``msg_``); values JSON
    cannot hold are written as ``str(value)``; a traceback goes in ``exc``.
    """

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": _utc_timestamp(record),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for name, value in fields_of(record).items():
            out[name + "_" if name in _JSON_CORE or name == "exc" else name] = value
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            out["exc"] = record.exc_text
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, ensure_ascii=False, separators=(",", ":"), default=str)


class BoundLogger(logging.LoggerAdapter):
    """A logger adapter whose context fields are merged into every call's ``extra``."""

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, MutableMapping[str, Any]]:
        extra = kwargs.get("extra")
        kwargs["extra"] = {**self.extra, **extra} if extra else self.extra  # type: ignore[dict-item]
        return msg, kwargs


def bind(logger: logging.Logger | logging.LoggerAdapter, **context: object) -> BoundLogger:
    """``bind(log, client_id="abc").info("subscribe", extra={"filter": f})`` logs both fields."""
    if isinstance(logger, BoundLogger):
        return BoundLogger(logger.logger, {**logger.extra, **context})  # type: ignore[dict-item]
    if isinstance(logger, logging.LoggerAdapter):
        logger = logger.logger
    return BoundLogger(logger, context)


def _gevent_threads_patched() -> bool:
    monkey = sys.modules.get("gevent.monkey")
    return monkey is not None and monkey.is_module_patched("threading")


def _running_hub() -> Any:
    """The gevent hub of this native thread when the process is monkey-patched (the node's worker),
    else None: there, records are written per loop turn instead of one write per record."""
    if not _gevent_threads_patched():
        return None
    from gevent._hub_local import get_hub_if_exists

    return get_hub_if_exists()


def _in_background(fn: Callable[[], None], delay: float = 0.0) -> Callable[[], None]:
    """Run ``fn`` on a native thread (gzip would otherwise stall the gevent hub) after ``delay``
    seconds; return a waiter."""

    def job() -> None:
        if delay > 0:
            time.sleep(delay)  # a native thread (the hub's threadpool under gevent): blocks nobody
        fn()

    if _gevent_threads_patched():
        import gevent

        result = gevent.get_hub().threadpool.spawn(job)
        return lambda: result.get()
    thread = threading.Thread(target=job, name="fluxmq-log-compress", daemon=True)
    thread.start()
    return thread.join


# Records held for the end of a loop turn at most: a long turn writes every this many (bounded memory,
# and a worker killed in a stuck turn loses at most these INFO lines).
MAX_PENDING = 256


class TurnBatching:
    """Mixin for a ``StreamHandler``: formatted records are collected and written with one
    ``write`` + ``flush`` per gevent loop turn (WARNING and above at once, every ``MAX_PENDING``
    records at once, and every record at once outside a gevent worker). One syscall per record was the cost of logging under load."""

    _pending: list[str]
    _scheduled: bool

    def _init_batching(self) -> None:
        self._pending = []
        self._scheduled = False

    def _queue(self, text: str, levelno: int) -> None:
        pending = self._pending
        pending.append(text)
        if levelno >= logging.WARNING or len(pending) >= MAX_PENDING:
            self._drain()
            return
        if self._scheduled:
            return  # this turn's write is already due
        hub = _running_hub()
        if hub is None:
            self._drain()
        else:
            self._scheduled = True
            hub.loop.run_callback(self._turn_ended)

    def _turn_ended(self) -> None:
        self._scheduled = False
        try:
            self._drain()
        except Exception as exc:  # a loop callback must not raise; say it where an operator looks
            sys.stderr.write(f"fluxmq.log: cannot write the log: {exc}\n")

    def _drain(self) -> None:
        pending = self._pending
        if not pending:
            return
        data = "".join(pending)
        pending.clear()
        stream = self.stream  # type: ignore[attr-defined]
        if stream is None:
            stream = self.stream = self._open()  # type: ignore[attr-defined]
        stream.write(data)
        stream.flush()

    def flush(self) -> None:
        with self.lock:  # type: ignore[attr-defined]
            self._drain()
        super().flush()  # type: ignore[misc]


class BatchedStream(TurnBatching, logging.StreamHandler):
    """stderr (or another stream) written once per loop turn (see ``TurnBatching``)."""

    def __init__(self, stream: TextIO | None = None) -> None:
        super().__init__(stream)
        self._init_batching()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._queue(self.format(record) + self.terminator, record.levelno)
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)

    def close(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            try:
                self._drain()
            except (OSError, ValueError):
                pass
        super().close()


# How often a RotatingFile looks whether another process rotated its file (seconds).
CHECK_INTERVAL = 1.0


class RotatingFile(TurnBatching, logging.handlers.RotatingFileHandler):
    """A log file rotated at ``max_bytes``: ``FILE.1`` (newest) .. ``FILE.N``, gzipped if ``compress``.

    Compression runs in the background (a native thread) so a 100 MiB rotation does not block the
    broker; the next rotation and ``close()`` wait for it. With ``backups == 0`` the file is
    truncated instead of rotated. When another process rotated the file (gunicorn's arbiter and
    worker share it), this one follows within ``check_interval`` seconds: the path is looked at
    (``stat``) at most that often, not per record, and the size is counted rather than asked for.
    A rotated file is compressed ``compress_delay`` seconds after the rotation, once every other
    process has moved to the new file. Records are written once per loop turn (``TurnBatching``).
    """

    def __init__(
        self,
        filename: str,
        max_bytes: int,
        backups: int,
        compress: bool = True,
        encoding: str = "utf-8",
        *,
        check_interval: float = CHECK_INTERVAL,
        compress_delay: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(filename, mode="a", maxBytes=max_bytes, backupCount=backups, encoding=encoding)
        self.compress = compress
        self.check_interval = check_interval
        self.compress_delay = check_interval + 0.5 if compress_delay is None else compress_delay
        self.clock = clock
        self._wait: Callable[[], None] | None = None
        self._init_batching()
        self._checked = clock()
        self._size = 0
        self._sized()

    def _sized(self) -> None:
        """Take the file's size (and whether it can rotate) from the open stream."""
        if self.stream is None:
            self.stream = self._open()
        info = os.fstat(self.stream.fileno())
        self._size = info.st_size
        self._regular = stat.S_ISREG(info.st_mode)  # never rotate /dev/stdout and the like

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record) + self.terminator
            now = self.clock()
            if now - self._checked >= self.check_interval:
                self._checked = now
                self._follow()
            # Characters, not bytes: a line with non-ASCII text rotates a little late, never early.
            if self.maxBytes > 0 and self._regular and self._size and self._size + len(text) >= self.maxBytes:
                self._drain()
                self.doRollover()
            self._size += len(text)
            self._queue(text, record.levelno)
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)

    def _follow(self) -> None:
        """Another process may have rotated the file: write to the file now at the path."""
        self._drain()
        if self.stream is not None and self._moved():
            self.stream.close()
            self.stream = None  # type: ignore[assignment]
        self._sized()

    def _moved(self) -> bool:
        try:
            at_path = os.stat(self.baseFilename)
        except FileNotFoundError:
            return True
        mine = os.fstat(self.stream.fileno())
        return (at_path.st_dev, at_path.st_ino) != (mine.st_dev, mine.st_ino)

    def backup_name(self, index: int) -> str:
        """The path of backup ``index`` (1 = newest)."""
        return f"{self.baseFilename}.{index}" + (".gz" if self.compress else "")

    def doRollover(self) -> None:  # noqa: N802 (logging's name)
        if self.stream:
            self.stream.close()
            self.stream = None  # type: ignore[assignment]
        self.wait_compression()
        if self.backupCount > 0:
            for i in range(self.backupCount - 1, 0, -1):
                src = self.backup_name(i)
                if os.path.exists(src):
                    os.replace(src, self.backup_name(i + 1))
            plain = f"{self.baseFilename}.1"
            if os.path.exists(self.baseFilename):
                os.replace(self.baseFilename, plain)
                if self.compress:
                    self._wait = _in_background(lambda: _gzip_file(plain, plain + ".gz"), self.compress_delay)
            self.stream = self._open()
        else:
            self.stream = open(self.baseFilename, "w", encoding=self.encoding)  # noqa: SIM115
        self._size = 0

    def wait_compression(self) -> None:
        """Block until the last rotated file is compressed."""
        wait, self._wait = self._wait, None
        if wait is not None:
            wait()

    def close(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            try:
                self._drain()
            except (OSError, ValueError):
                pass
        self.wait_compression()
        super().close()


def _gzip_file(src: str, dst: str) -> None:
    tmp = dst + ".tmp"
    try:
        with open(src, "rb") as fin, gzip.open(tmp, "wb", compresslevel=6) as fout:
            shutil.copyfileobj(fin, fout, 1 << 20)
        os.replace(tmp, dst)
        os.unlink(src)
    except OSError as exc:  # the uncompressed backup stays; say so where an operator will see it
        sys.stderr.write(f"fluxmq.log: cannot compress {src}: {exc}\n")


class ThrottlingHandler(logging.Handler):
    """Forwards records to ``target`` through a token bucket per logger (``rate``/s, ``burst``).

    A record that finds its logger's bucket empty is dropped and counted; the next record that
    passes is preceded by one ``log_throttled`` warning with ``suppressed=N``. ``close()`` reports
    counts still pending. ``clock`` (seconds, monotonic) is injectable for tests.
    """

    def __init__(
        self, target: logging.Handler, rate: float, burst: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        super().__init__()
        self.target = target
        self.rate = float(rate)
        self.burst = int(burst)
        self.clock = clock
        self._buckets: dict[str, list[float]] = {}  # logger name -> [tokens, last refill time]
        self._suppressed: dict[str, int] = {}

    def emit(self, record: logging.LogRecord) -> None:
        now = self.clock()
        bucket = self._buckets.get(record.name)
        if bucket is None:
            bucket = self._buckets[record.name] = [float(self.burst), now]
        else:
            elapsed = max(0.0, now - bucket[1])
            bucket[0] = min(float(self.burst), bucket[0] + elapsed * self.rate)
            bucket[1] = now
        if bucket[0] < 1.0:
            self._suppressed[record.name] = self._suppressed.get(record.name, 0) + 1
            return
        bucket[0] -= 1.0
        dropped = self._suppressed.pop(record.name, 0)
        if dropped:
            self.target.handle(self._summary(record.name, dropped))
        self.target.handle(record)

    def _summary(self, name: str, dropped: int) -> logging.LogRecord:
        record = logging.LogRecord(name, logging.WARNING, __file__, 0, "log_throttled", None, None)
        record.suppressed = dropped
        record.rate = self.rate
        record.burst = self.burst
        return record

    def setFormatter(self, fmt: logging.Formatter | None) -> None:  # noqa: N802 (logging's name)
        self.target.setFormatter(fmt)

    def flush(self) -> None:
        self.target.flush()

    def close(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            pending, self._suppressed = self._suppressed, {}
        for name, dropped in pending.items():
            self.target.handle(self._summary(name, dropped))
        self.target.close()
        super().close()


def setup_logging(
    log: Any, *, stream: TextIO | None = None, clock: Callable[[], float] | None = None
) -> logging.Handler:
    """Configure the ``fluxmq`` logger from the ``log`` config section; return the installed handler.

    ``log`` is ``cfg.log`` (``level``, ``format``, ``file``, ``max_size_mb``, ``max_backups``,
    ``compress``, ``throttling.enabled/rate/burst``). ``stream`` replaces stderr when ``log.file``
    is empty. Calling it again replaces (and closes) the handler installed before.
    """
    logger = logging.getLogger(ROOT_LOGGER)
    for old in list(logger.handlers):
        if getattr(old, "_fluxmq_setup", False):
            logger.removeHandler(old)
            old.close()
    formatter: logging.Formatter = JsonFormatter() if log.format == "json" else TextFormatter()
    target: logging.Handler
    if log.file:
        try:
            parent = os.path.dirname(os.path.abspath(log.file))
            os.makedirs(parent, exist_ok=True)
            target = RotatingFile(
                log.file,
                max_bytes=int(log.max_size_mb) * 1024 * 1024,
                backups=int(log.max_backups),
                compress=bool(log.compress),
            )
        except OSError as exc:
            raise ConfigError(
                "log.file",
                "a writable file",
                log.file,
                problem=f"cannot open the log file: {exc.strerror or exc}",
            ) from None
    else:
        target = BatchedStream(stream if stream is not None else sys.stderr)
    target.setFormatter(formatter)
    handler = target
    if log.throttling.enabled:
        handler = ThrottlingHandler(
            target,
            log.throttling.rate,
            log.throttling.burst,
            clock=clock if clock is not None else time.monotonic,
        )
    handler._fluxmq_setup = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.setLevel(effective_level(log))
    logger.propagate = False
    return handler


def effective_level(log: Any) -> int:
    """The level ``log`` asks for: ``log.trace``, then ``log.debug`` (hard overrides), then ``log.level``."""
    if getattr(log, "trace", False):
        return TRACE
    if getattr(log, "debug", False):
        return logging.DEBUG
    return LEVELS[log.level]
