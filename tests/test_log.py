"""fluxmq.log: text and JSON lines, rotation with gzip, throttling (counted with an injected clock)."""

from __future__ import annotations

import gzip
import io
import json
import logging
import os
import re
from pathlib import Path

import pytest

from fluxmq.config import load_config
from fluxmq.errors import ConfigError
from fluxmq.log import (
    JsonFormatter,
    RotatingFile,
    TextFormatter,
    ThrottlingHandler,
    bind,
    format_fields,
    setup_logging,
)

TEXT_LINE = re.compile(
    r"(?P<ts>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z) (?P<level>[A-Z]+) (?P<logger>\S+) (?P<rest>.*)"
)


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(autouse=True)
def restore_fluxmq_logger():
    """setup_logging changes the process-wide ``fluxmq`` logger; put it back after each test."""
    logger = logging.getLogger("fluxmq")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    yield
    for handler in list(logger.handlers):
        if handler not in saved[0]:
            logger.removeHandler(handler)
            handler.close()
    logger.setLevel(saved[1])
    logger.propagate = saved[2]


def log_section(*overrides: str):
    return load_config(env={}, overrides=overrides).log


def test_text_line_format() -> None:
    out = io.StringIO()
    setup_logging(log_section(), stream=out)
    logging.getLogger("fluxmq.broker").info("connect", extra={"client_id": "abc", "peer": "127.0.0.1:5555"})
    line = out.getvalue()
    assert line.endswith("\n") and line.count("\n") == 1
    m = TEXT_LINE.fullmatch(line.rstrip("\n"))
    assert m is not None, line
    assert m["level"] == "INFO" and m["logger"] == "fluxmq.broker"
    assert m["rest"] == "event=connect client_id=abc peer=127.0.0.1:5555"


def test_text_quotes_values_that_need_it() -> None:
    assert format_fields(
        {"a": "x y", "b": "", "c": 'q"', "d": None, "e": True, "f": 1.5, "g": "k=v", "h": "line\nbreak"}
    ) == ('a="x y" b="" c="q\\"" d=null e=true f=1.5 g="k=v" h="line\\nbreak"')


def test_text_message_with_args_and_traceback() -> None:
    out = io.StringIO()
    setup_logging(log_section(), stream=out)
    log = logging.getLogger("fluxmq.protocol")
    log.warning("client %s gone", "c1")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.exception("handler_failed", extra={"client_id": "c2"})
    lines = out.getvalue().splitlines()
    assert lines[0].endswith('WARNING fluxmq.protocol event="client c1 gone"')
    assert lines[1].endswith("ERROR fluxmq.protocol event=handler_failed client_id=c2")
    assert lines[2] == "Traceback (most recent call last):"
    assert lines[-1] == "RuntimeError: boom"


def test_json_lines_parse() -> None:
    out = io.StringIO()
    setup_logging(log_section("log.format=json"), stream=out)
    log = logging.getLogger("fluxmq.broker")
    log.info("connect", extra={"client_id": "abc", "peer": "127.0.0.1:5555", "qos": 1, "obj": object()})
    log.warning("odd", extra={"msg_field": "x", "level_": 3})
    try:
        raise ValueError("bad")
    except ValueError:
        log.error("failed", exc_info=True)
    records = [json.loads(line) for line in out.getvalue().splitlines()]
    assert len(records) == 3
    first = records[0]
    assert list(first)[:4] == ["ts", "level", "logger", "msg"]
    assert first["level"] == "INFO" and first["logger"] == "fluxmq.broker" and first["msg"] == "connect"
    assert first["client_id"] == "abc" and first["qos"] == 1 and first["obj"].startswith("<object")
    assert TEXT_LINE.match(first["ts"] + " X y z")
    assert records[2]["exc"].endswith("ValueError: bad")


def test_json_field_named_like_a_core_key_does_not_replace_it() -> None:
    record = logging.LogRecord("fluxmq.x", logging.INFO, __file__, 1, "event", None, None)
    record.ts = "mine"
    record.logger = "other"
    out = json.loads(JsonFormatter().format(record))
    assert out["ts"] != "mine" and out["ts_"] == "mine"
    assert out["logger"] == "fluxmq.x" and out["logger_"] == "other"


def test_level_filters_and_disabled_calls_do_not_format() -> None:
    """Cheap when disabled: a field of a filtered-out call is never turned into text."""

    class Counted:
        calls = 0

        def __str__(self) -> str:
            Counted.calls += 1
            return "counted"

    out = io.StringIO()
    setup_logging(log_section("log.level=warning"), stream=out)
    log = logging.getLogger("fluxmq.broker")
    log.info("hidden", extra={"v": Counted()})
    log.debug("hidden", extra={"v": Counted()})
    assert out.getvalue() == "" and Counted.calls == 0
    log.warning("shown", extra={"v": Counted()})
    assert "event=shown v=counted" in out.getvalue() and Counted.calls == 1


def test_bind_merges_context() -> None:
    out = io.StringIO()
    setup_logging(log_section(), stream=out)
    conn = bind(logging.getLogger("fluxmq.transport"), client_id="c1", peer="127.0.0.1:1")
    conn.info("subscribe", extra={"filter": "a/#"})
    bind(conn, proto=5).info("publish")
    lines = out.getvalue().splitlines()
    assert lines[0].endswith("event=subscribe client_id=c1 peer=127.0.0.1:1 filter=a/#")
    assert lines[1].endswith("event=publish client_id=c1 peer=127.0.0.1:1 proto=5")


def test_setup_twice_replaces_the_handler_and_stops_propagation() -> None:
    first, second = io.StringIO(), io.StringIO()
    setup_logging(log_section(), stream=first)
    setup_logging(log_section(), stream=second)
    logger = logging.getLogger("fluxmq")
    assert len([h for h in logger.handlers if getattr(h, "_fluxmq_setup", False)]) == 1
    assert logger.propagate is False
    logging.getLogger("fluxmq.node").info("started")
    assert first.getvalue() == "" and "event=started" in second.getvalue()


# -- rotation ---------------------------------------------------------------------------------------


def write_lines(
    handler: logging.Handler, count: int, formatter: logging.Formatter | None = None
) -> list[str]:
    handler.setFormatter(formatter or logging.Formatter("%(message)s"))
    messages = [f"line {i:04d} " + "x" * 40 for i in range(count)]
    for message in messages:
        handler.handle(logging.LogRecord("fluxmq.t", logging.INFO, __file__, 1, message, None, None))
    return messages


def test_rotation_keeps_max_backups_gzipped(tmp_path: Path) -> None:
    path = tmp_path / "fluxmq.log"
    handler = RotatingFile(str(path), max_bytes=500, backups=3, compress=True, compress_delay=0)
    messages = write_lines(handler, 100)
    handler.close()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["fluxmq.log", "fluxmq.log.1.gz", "fluxmq.log.2.gz", "fluxmq.log.3.gz"]
    # Newest first: .1 holds the lines just before the live file, .3 the oldest kept.
    kept = []
    for i in (3, 2, 1):
        with gzip.open(tmp_path / f"fluxmq.log.{i}.gz", "rt", encoding="utf-8") as f:
            kept += f.read().splitlines()
    kept += path.read_text(encoding="utf-8").splitlines()
    assert kept == messages[-len(kept) :]
    assert path.stat().st_size <= 500
    assert len(kept) < len(messages)  # older lines went with the dropped backups


def test_rotation_without_compression(tmp_path: Path) -> None:
    path = tmp_path / "plain.log"
    handler = RotatingFile(str(path), max_bytes=300, backups=2, compress=False)
    messages = write_lines(handler, 30)
    handler.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain.log", "plain.log.1", "plain.log.2"]
    kept = []
    for name in ("plain.log.2", "plain.log.1", "plain.log"):
        kept += (tmp_path / name).read_text(encoding="utf-8").splitlines()
    assert kept == messages[-len(kept) :]


def test_zero_backups_truncates(tmp_path: Path) -> None:
    path = tmp_path / "t.log"
    handler = RotatingFile(str(path), max_bytes=300, backups=0, compress=True, compress_delay=0)
    messages = write_lines(handler, 30)
    handler.close()
    assert [p.name for p in tmp_path.iterdir()] == ["t.log"]
    lines = path.read_text(encoding="utf-8").splitlines()
    assert 0 < len(lines) < len(messages) and lines == messages[-len(lines) :]


def test_setup_logging_to_file(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "fluxmq.log"
    handler = setup_logging(
        log_section(
            f"log.file={path}",
            "log.max_size_mb=3",
            "log.max_backups=2",
            "log.compress=false",
            "log.format=json",
        )
    )
    assert isinstance(handler, ThrottlingHandler)
    target = handler.target
    assert isinstance(target, RotatingFile)
    assert (target.maxBytes, target.backupCount, target.compress) == (3 * 1024 * 1024, 2, False)
    logging.getLogger("fluxmq.node").info("started", extra={"pid": 7})
    handler.flush()
    record = json.loads(path.read_text(encoding="utf-8"))
    assert record["msg"] == "started" and record["pid"] == 7


def test_unwritable_log_file_is_a_config_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match=r"^config error: log.file \(.*\): cannot open the log file"):
        setup_logging(log_section(f"log.file={blocker}/x.log"))


# -- throttling -------------------------------------------------------------------------------------


def throttled(rate: float, burst: int) -> tuple[io.StringIO, FakeClock]:
    out, clock = io.StringIO(), FakeClock()
    setup_logging(
        log_section(f"log.throttling.rate={rate}", f"log.throttling.burst={burst}"), stream=out, clock=clock
    )
    return out, clock


def events(out: io.StringIO) -> list[str]:
    return [TEXT_LINE.fullmatch(line)["rest"] for line in out.getvalue().splitlines()]


def test_throttling_drops_beyond_burst_and_reports_the_count() -> None:
    out, clock = throttled(rate=1, burst=5)
    log = logging.getLogger("fluxmq.broker")
    for i in range(20):
        log.info("tick", extra={"i": i})
    assert events(out) == [f"event=tick i={i}" for i in range(5)]
    clock.now += 2.0  # two tokens back
    log.info("tick", extra={"i": 20})
    log.info("tick", extra={"i": 21})
    log.info("tick", extra={"i": 22})
    lines = events(out)
    assert lines[5] == "event=log_throttled suppressed=15 rate=1.0 burst=5"
    assert lines[6:] == ["event=tick i=20", "event=tick i=21"]
    assert "WARNING fluxmq.broker event=log_throttled" in out.getvalue()


def test_throttling_is_per_logger() -> None:
    out, _clock = throttled(rate=1, burst=2)
    noisy, quiet = logging.getLogger("fluxmq.noisy"), logging.getLogger("fluxmq.quiet")
    for _ in range(10):
        noisy.info("spam")
    quiet.info("hello")
    text = out.getvalue()
    assert text.count("fluxmq.noisy event=spam") == 2
    assert "fluxmq.quiet event=hello" in text


def test_throttling_refill_is_capped_at_burst() -> None:
    out, clock = throttled(rate=100, burst=3)
    log = logging.getLogger("fluxmq.x")
    clock.now += 3600.0
    for _ in range(10):
        log.info("e")
    assert events(out).count("event=e") == 3


def test_throttled_counts_are_reported_at_close() -> None:
    out, _clock = throttled(rate=1, burst=1)
    log = logging.getLogger("fluxmq.x")
    for _ in range(4):
        log.info("e")
    handler = next(h for h in logging.getLogger("fluxmq").handlers if getattr(h, "_fluxmq_setup", False))
    handler.close()
    assert events(out) == ["event=e", "event=log_throttled suppressed=3 rate=1.0 burst=1"]


def test_throttling_disabled_passes_everything() -> None:
    out = io.StringIO()
    handler = setup_logging(log_section("log.throttling.enabled=false", "log.throttling.burst=1"), stream=out)
    assert not isinstance(handler, ThrottlingHandler)
    for _ in range(100):
        logging.getLogger("fluxmq.x").info("e")
    assert out.getvalue().count("event=e") == 100


def test_throttling_handler_wraps_any_target() -> None:
    out, clock = io.StringIO(), FakeClock()
    target = logging.StreamHandler(out)
    handler = ThrottlingHandler(target, rate=2.0, burst=2, clock=clock)
    handler.setFormatter(TextFormatter())
    record = logging.LogRecord("fluxmq.y", logging.INFO, __file__, 1, "e", None, None)
    for _ in range(5):
        handler.handle(record)
    clock.now += 0.5  # one token at 2/s
    handler.handle(record)
    handler.handle(record)
    assert [line.split(" ", 3)[3] for line in out.getvalue().splitlines()] == [
        "event=e",
        "event=e",
        "event=log_throttled suppressed=3 rate=2.0 burst=2",
        "event=e",
    ]


def test_a_file_rotated_by_another_process_is_reopened(tmp_path: Path) -> None:
    """gunicorn's arbiter and worker share the log file: after one rotates, the other follows."""
    path = tmp_path / "shared.log"
    now = [0.0]
    a = RotatingFile(str(path), max_bytes=200, backups=2, compress=False)
    b = RotatingFile(str(path), max_bytes=10**6, backups=2, compress=False, clock=lambda: now[0])
    write_lines(b, 1)
    write_lines(a, 5)  # a rotates at least once
    assert (tmp_path / "shared.log.1").exists()
    now[0] += 1.0  # b looks at the path at most once per check_interval (1 s), not per record
    b.setFormatter(logging.Formatter("%(message)s"))
    b.handle(logging.LogRecord("fluxmq.t", logging.INFO, __file__, 1, "from b after rotation", None, None))
    a.close()
    b.close()
    assert path.read_text(encoding="utf-8").splitlines()[-1] == "from b after rotation"


def test_background_compression_under_gevent(tmp_path: Path) -> None:
    """With gevent's monkey patching the gzip runs on the hub's native threadpool and still completes."""
    import subprocess
    import sys

    script = (
        "from gevent import monkey; monkey.patch_all()\n"
        "import logging, sys\n"
        "from fluxmq.log import RotatingFile\n"
        "h = RotatingFile(sys.argv[1], max_bytes=300, backups=2, compress=True, compress_delay=0)\n"
        "h.setFormatter(logging.Formatter('%(message)s'))\n"
        "for i in range(40):\n"
        "    h.handle(logging.LogRecord('fluxmq.t', 20, '', 1, 'line %04d ' % i + 'x' * 40, None, None))\n"
        "h.close()\n"
    )
    path = tmp_path / "g.log"
    subprocess.run([sys.executable, "-c", script, str(path)], check=True, timeout=60)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.log", "g.log.1.gz", "g.log.2.gz"]
    with gzip.open(tmp_path / "g.log.1.gz", "rt", encoding="utf-8") as f:
        assert f.read().startswith("line ")


# -- cost per record (issue 17 item 6) -------------------------------------------------------------


def test_a_record_costs_no_stat_of_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The handler stat'ed the path (three times) and asked the file position for every record; now
    it looks at the path once per check_interval and counts the size itself."""
    now = [0.0]
    handler = RotatingFile(
        str(tmp_path / "f.log"), max_bytes=10**6, backups=1, compress=False, clock=lambda: now[0]
    )
    calls = []
    for name in ("stat", "fstat", "lstat"):
        real = getattr(os, name)
        monkeypatch.setattr(
            os, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k)
        )
    write_lines(handler, 1000)
    assert calls == []
    now[0] += 1.0
    write_lines(handler, 10)
    assert sorted(calls) == ["fstat", "fstat", "stat"]  # one look per interval: path, own file, size
    monkeypatch.undo()
    handler.close()
    assert len((tmp_path / "f.log").read_text().splitlines()) == 1010


def test_size_is_counted_across_turns_and_rotation_still_happens(tmp_path: Path) -> None:
    handler = RotatingFile(
        str(tmp_path / "r.log"), max_bytes=1000, backups=1, compress=False, clock=lambda: 0.0
    )
    write_lines(handler, 100)
    handler.close()
    assert (tmp_path / "r.log.1").exists() and (tmp_path / "r.log").stat().st_size <= 1000


BATCH_SCRIPT = """
from gevent import monkey; monkey.patch_all()
import logging, os, sys, gevent
from fluxmq.log import RotatingFile
h = RotatingFile(sys.argv[1], max_bytes=10**6, backups=1, compress=False)
h.setFormatter(logging.Formatter('%(message)s'))
log = logging.getLogger('fluxmq.batch'); log.addHandler(h); log.setLevel(logging.INFO); log.propagate = False
def size(): return os.path.getsize(sys.argv[1])
def turn():
    for i in range(100):
        log.info('line %d', i)
    print('after 100 infos', size(), flush=True)
    log.warning('now')
    print('after a warning', size(), flush=True)
    log.info('tail')
    print('after 1 info', size(), flush=True)
gevent.spawn(turn).join()
gevent.sleep(0)
print('next turn', size(), flush=True)
"""


def test_records_are_written_once_per_loop_turn_in_a_gevent_worker(tmp_path: Path) -> None:
    """In the node's worker a write per record was a syscall per record: now the turn's records go
    in one write when the turn ends; a WARNING or worse is written at once (with what came before)."""
    import subprocess
    import sys

    path = tmp_path / "b.log"
    out = subprocess.run(
        [sys.executable, "-c", BATCH_SCRIPT, str(path)],
        check=True,
        timeout=60,
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    ).stdout
    sizes = dict(line.rsplit(" ", 1) for line in out.splitlines())
    hundred = sum(len(f"line {i}\n") for i in range(100))
    assert sizes == {
        "after 100 infos": "0",
        "after a warning": str(hundred + len("now\n")),
        "after 1 info": str(hundred + len("now\n")),
        "next turn": str(hundred + len("now\n") + len("tail\n")),
    }, out
