"""The admin API of a real node against ``fluxmq/http/openapi.yaml``, fuzzed by schemathesis.

Every operation of the file gets generated requests: the boundary and invalid values of each
parameter and body (coverage phase), random valid and invalid ones (fuzzing), chains of calls
(stateful), methods the file does not list, and requests without the token. Each answer must be no
server error and keep to the file: documented status code, schema, content type and headers, 405
with a true ``Allow`` for another method, 401 without the token. Bounded (20 examples per operation)
and derandomized: the same requests on every run.

schemathesis runs as its command line (``st run``): its pytest plugin does not run under this
pytest. ``GET /monitor`` answers a valid request with an endless event stream, which the command
would wait out, so its requests are generated here (hypothesis, the same bounds) and a 200 is
checked from the headers before the stream is closed.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings

from fluxmq.http.admin import SPEC_PATH
from tests.conftest import NodeFactory, RunningNode

pytestmark = pytest.mark.e2e

TOKEN = "openapi-fuzz-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
EXAMPLES = 20  # per operation and phase
SEED = 20261207
STREAM = "/monitor"
RUN_TIMEOUT = 80.0  # the whole command; it takes ~10 s
REQUEST_TIMEOUT = 10.0  # every answer but a stream's comes at once
CONFIG = Path(__file__).with_name("schemathesis.toml")  # which statuses count as refusals


@pytest.fixture(scope="module")
def fuzzed_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningNode]:
    """A node with an admin token (cluster off), shared by this module's tests."""
    factory = NodeFactory(tmp_path_factory.mktemp("openapi"))
    try:
        yield factory(env={"FLUXMQ_ADMIN_TOKEN": TOKEN})
    finally:
        factory.close()


def base_url(node: RunningNode) -> str:
    return f"http://{node.host}:{node.admin_port}"


def test_every_operation_keeps_to_the_openapi_file(fuzzed_node: RunningNode, tmp_path: Path) -> None:
    command = [
        sys.executable,
        "-m",
        "schemathesis.cli",
        f"--config-file={CONFIG}",
        "run",
        str(SPEC_PATH),
        f"--url={base_url(fuzzed_node)}",
        f"--header=Authorization: Bearer {TOKEN}",
        "--checks=all",
        f"--exclude-path={STREAM}",
        f"--max-examples={EXAMPLES}",
        f"--seed={SEED}",
        "--generation-deterministic",
        "--suppress-health-check=all",
        f"--request-timeout={REQUEST_TIMEOUT}",
        "--workers=1",
        "--no-color",
    ]
    run = subprocess.run(
        command, cwd=tmp_path, capture_output=True, text=True, timeout=RUN_TIMEOUT, stdin=subprocess.DEVNULL
    )
    assert run.returncode == 0, run.stdout[-20000:] + run.stderr[-5000:]
    assert "22 selected / 23 total" in run.stdout  # every operation but the stream's


MONITOR = schemathesis.openapi.from_path(SPEC_PATH)[STREAM]["GET"]


@pytest.mark.parametrize("mode", list(schemathesis.GenerationMode), ids=lambda mode: mode.value)
def test_the_monitor_stream_keeps_to_the_openapi_file(
    fuzzed_node: RunningNode, mode: schemathesis.GenerationMode
) -> None:
    @given(case=MONITOR.as_strategy(generation_mode=mode))
    @settings(
        max_examples=EXAMPLES,
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def one(case: schemathesis.Case) -> None:
        kwargs = case.as_transport_kwargs(base_url(fuzzed_node), AUTH)
        with requests.request(**kwargs, timeout=REQUEST_TIMEOUT, stream=True) as response:
            if response.status_code == 200:  # the stream: its headers, then closed
                assert response.headers["Content-Type"].startswith("text/event-stream")
                return
            case.validate_response(response, headers=AUTH)

    one()
