"""The web dashboard in a real browser: Debian's chromium, headless, driven by selenium through
chromium-driver, against a real node (issue 15, "Dashboard").

The browser signs in with the admin token, sees a paho client appear, disconnects it with the
button (the client sees the DISCONNECT 0x98), watches a publish arrive in the topic monitor and
reads retained messages as text and hex. A wrong token and a stopped node each show the error
screen. Screenshots go to the test's tmp dir (their paths are printed; ``pytest -s`` shows them);
with ``FLUXMQ_UPDATE_DOCS=1`` the overview at 1280x800 is also written to ``docs/dashboard.png``.

Chromium runs with a fresh profile and every background service off: the machine may have no
outside network, and the page must need none.
"""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from tests.conftest import REPO_ROOT, NodeFactory, RunningNode
from tests.e2e.mqttraw import PahoClient, paho_connected, unique, wait_until
from tests.e2e.test_http_bridge import http_request

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions as ec  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

pytestmark = pytest.mark.e2e

TOKEN = "dashboard-e2e-token"
WAIT = 60.0  # every browser wait is bounded by this (generous: CI runs the suite on a loaded machine)
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,800",
)
DOCS_SCREENSHOT = REPO_ROOT / "docs" / "dashboard.png"


@pytest.fixture(scope="module")
def dashboard_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningNode]:
    factory = NodeFactory(tmp_path_factory.mktemp("dashboard"))
    try:
        yield factory({"storage.type": "lmdb", "storage.sync": "batch"}, env={"FLUXMQ_ADMIN_TOKEN": TOKEN})
    finally:
        factory.close()


def start_browser(profile: Path):
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.skip(
            "chromium and chromium-driver are not installed (scripts/test installs them: "
            "apt-get install chromium chromium-driver)"
        )
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    # An explicit driver path: selenium then never tries to download one.
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(WAIT)
    viewport(driver, 1280, 800)
    return driver


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory):
    driver = start_browser(tmp_path_factory.mktemp("chromium-profile"))
    try:
        yield driver
    finally:
        driver.quit()


def viewport(driver, width: int, height: int, mobile: bool = False) -> None:
    """Exactly ``width`` x ``height`` CSS pixels at scale 1, so screenshots have that size."""
    driver.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile},
    )


def wait_for(driver, condition: Callable, what: str, timeout: float = WAIT):
    return WebDriverWait(
        driver,
        timeout,
        poll_frequency=0.1,
        ignored_exceptions=(NoSuchElementException, StaleElementReferenceException),
    ).until(condition, what)


def visible(driver, css: str, what: str = ""):
    return wait_for(
        driver, ec.visibility_of_element_located((By.CSS_SELECTOR, css)), what or f"{css} visible"
    )


def click(driver, css: str, what: str) -> None:
    """Click ``css`` once it is shown. A list that follows the node (the clients list) re-renders
    its rows: an element found just before a re-render is stale at the click (the click is refused,
    never made), so look-up and click are retried together (bounded)."""

    def clicked(d) -> bool:
        element = d.find_element(By.CSS_SELECTOR, css)
        if not element.is_displayed():
            return False
        element.click()
        return True

    wait_for(driver, clicked, what)


def text_of(driver, css: str) -> str:
    return driver.find_element(By.CSS_SELECTOR, css).text


SCREEN_SHOWN = "return ['login', 'error', 'app'].some((id) => !document.getElementById(id).hidden)"


def open_dashboard(driver, node: RunningNode) -> None:
    """A fresh page with no token kept (sessionStorage cleared).

    The first load signs in by itself with a token an earlier test left in the tab; that sign-in
    (an async /stats call) stores the token when it ends, after ``get`` has returned. So the page
    must have settled on a screen (the sign-in ended) before the storage is cleared: a clear before
    that was undone, the reload signed in, and the login screen never came (the flake under load)."""
    url = f"http://127.0.0.1:{node.admin_port}/dashboard/"
    driver.get(url)
    wait_for(driver, lambda d: d.execute_script(SCREEN_SHOWN), "the first load's screen")
    driver.execute_script("window.sessionStorage.clear()")
    driver.get(url)


def sign_in(driver, token: str) -> None:
    field = visible(driver, "#token", "the login screen")
    field.clear()
    field.send_keys(token)
    driver.find_element(By.ID, "login-button").click()


def tab(driver, name: str) -> None:
    driver.find_element(By.CSS_SELECTOR, f'#tabs button[data-tab="{name}"]').click()
    visible(driver, f"#tab-{name}")


def screenshot(driver, path: Path) -> Path:
    assert driver.save_screenshot(str(path)), path
    print(f"dashboard screenshot: {path}")
    return path


def monitor_sessions(node: RunningNode) -> list[str]:
    _, _, body = http_request(
        node,
        "GET",
        "/sessions?connected=true",
        headers={"Authorization": f"Bearer {TOKEN}"},
        port=node.admin_port,
    )
    return [s["client_id"] for s in body["sessions"] if s["client_id"].startswith("admin-monitor-")]


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


class Traffic:
    """A bounded publisher: ``count`` messages, ``interval`` apart, then it stops by itself."""

    def __init__(self, client: PahoClient, topic: str, count: int, interval: float) -> None:
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(client, topic, count, interval), daemon=True)
        self.thread.start()

    def _run(self, client: PahoClient, topic: str, count: int, interval: float) -> None:
        for n in range(count):
            if self.stop.wait(interval * (1 + (n // 150) % 3)):  # rate steps, so the charts move
                return
            client.client.publish(topic, f"reading {n}".encode(), qos=0)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(WAIT)


def test_dashboard_end_to_end(browser, dashboard_node: RunningNode, tmp_path: Path) -> None:
    node = dashboard_node
    driver = browser
    viewport(driver, 1280, 800)
    client_id = unique("dash-client")
    watched: PahoClient | None = None
    publisher = paho_connected(node, unique("dash-publisher"))
    publisher.subscribe("dash/sensors/#")  # so messages go out as well as in
    traffic = Traffic(publisher, "dash/sensors/k1/temp", count=2000, interval=0.02)
    try:
        # sign in; the overview fills in from /stats and the charts draw from the second sample
        open_dashboard(driver, node)
        sign_in(driver, TOKEN)
        visible(driver, "#app", "the dashboard after sign-in")
        assert driver.execute_script("return sessionStorage.getItem('fluxmq.admin.token')") == TOKEN
        wait_for(driver, lambda d: text_of(d, "#stat-connections") not in ("", "–"), "connections shown")
        wait_for(
            driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#chart-in polyline"), "the in chart drawn"
        )
        wait_for(driver, lambda d: text_of(d, "#rate-in") not in ("–", "0.0"), "messages in per second")
        assert text_of(driver, "#stat-sync") == "batch"
        assert "lmdb" in text_of(driver, "#stat-storage-detail")
        assert text_of(driver, "#stat-memory").endswith("MiB")
        # a few more samples so the charts show a line, not a dot
        wait_for(
            driver,
            lambda d: (
                d.execute_script(
                    "return document.querySelector('#chart-in polyline').getAttribute('points').split(' ').length"
                )
                >= 4
            ),
            "four samples in the chart",
        )
        overview = screenshot(driver, tmp_path / "dashboard-overview-1280x800.png")
        assert png_size(overview) == (1280, 800)
        if os.environ.get("FLUXMQ_UPDATE_DOCS") == "1":
            # the docs show a chart with some history: 20 more seconds of samples
            wait_for(
                driver,
                lambda d: (
                    d.execute_script(
                        "return document.querySelector('#chart-in polyline').getAttribute('points').split(' ').length"
                    )
                    >= 12
                ),
                "twelve samples in the chart",
                timeout=60,
            )
            overview = screenshot(driver, tmp_path / "dashboard-overview-1280x800.png")
            DOCS_SCREENSHOT.write_bytes(overview.read_bytes())
            print(f"docs screenshot updated: {DOCS_SCREENSHOT}")
        viewport(driver, 390, 844, mobile=True)
        screenshot(driver, tmp_path / "dashboard-overview-390.png")
        viewport(driver, 1280, 800)

        # a paho client connects while the clients list is open: it appears (the list follows the
        # node), found by the search; the list re-renders, so elements are looked up afresh
        tab(driver, "clients")
        search = driver.find_element(By.ID, "client-search")
        search.send_keys(client_id)
        wait_for(driver, lambda d: "No client matches" in text_of(d, "#clients-body"), "the empty search")
        watched = paho_connected(node, client_id, protocol=mqtt.MQTTv5)
        watched.subscribe("dash/alerts/#", qos=1)
        row_css = f'#clients-body tr[data-client="{client_id}"]'
        wait_for(
            driver,
            lambda d: "connected" in d.find_element(By.CSS_SELECTOR, row_css).text,
            "the paho client's row, connected",
        )
        assert [
            r.get_attribute("data-client") for r in driver.find_elements(By.CSS_SELECTOR, "#clients-body tr")
        ] == [client_id]
        click(driver, f"{row_css} button.client-id", "the client's id")
        detail = visible(driver, "#client-detail", "the session detail")
        wait_for(
            driver,
            lambda d: "dash/alerts/#" in d.find_element(By.ID, "client-detail").text,
            "its subscription in the detail",
        )
        assert "MQTT 5.0" in detail.text
        search.clear()
        screenshot(driver, tmp_path / "dashboard-clients-1280x800.png")
        viewport(driver, 390, 844, mobile=True)
        screenshot(driver, tmp_path / "dashboard-clients-390.png")
        viewport(driver, 1280, 800)

        # subscriptions by filter
        tab(driver, "subscriptions")
        wait_for(
            driver,
            lambda d: any(
                r.text.startswith("dash/alerts/#") for r in d.find_elements(By.CSS_SELECTOR, "#subs-body tr")
            ),
            "the filter listed",
        )

        # Disconnect: confirm, and the client sees the server's DISCONNECT (0x98 administrative action)
        tab(driver, "clients")
        click(driver, f"{row_css} button.disconnect", "the Disconnect button")
        wait_for(driver, ec.alert_is_present(), "the confirmation").accept()
        assert watched.wait_disconnected(WAIT), "the client did not observe the disconnect"
        assert watched.disconnect_reason is not None and watched.disconnect_reason.value == 0x98
        wait_for(driver, lambda d: "Disconnected" in text_of(d, "#toast"), "the disconnect confirmed")

        # the topic monitor: subscribe to a filter and watch a publish arrive
        tab(driver, "monitor")
        monitor_filter = driver.find_element(By.ID, "monitor-filter")
        monitor_filter.clear()
        monitor_filter.send_keys("dash/monitor/#")
        driver.find_element(By.ID, "monitor-toggle").click()
        wait_for(
            driver, lambda d: text_of(d, "#monitor-state") == "watching dash/monitor/#", "the monitor open"
        )
        publisher.publish("dash/monitor/door", "opened at 07:15", qos=1)
        row = wait_for(
            driver,
            lambda d: next(
                (
                    r
                    for r in d.find_elements(By.CSS_SELECTOR, "#monitor-body tr.monitor-row")
                    if "dash/monitor/door" in r.text
                ),
                None,
            ),
            "the publish in the monitor",
        )
        assert row.find_element(By.CSS_SELECTOR, "td.payload-cell").text == "opened at 07:15"
        screenshot(driver, tmp_path / "dashboard-monitor-1280x800.png")
        driver.find_element(By.ID, "monitor-toggle").click()  # stop: the stream and its session end
        wait_for(driver, lambda d: text_of(d, "#monitor-toggle") == "Watch", "the monitor stopped")
        assert wait_until(lambda: not monitor_sessions(node), WAIT), "a monitor session outlived its stream"

        # retained messages: text and hex
        publisher.publish("dash/retained/greeting", "héllo wörld".encode(), qos=1, retain=True)
        publisher.publish("dash/retained/blob", b"\x00\x01hi\xff", qos=1, retain=True)
        tab(driver, "retained")
        # Opening the tab loads the list for its filter ("#"); only once that list is shown can the
        # next one be told apart (it replaces every item), else the "#" list's button was found and
        # the filter's list replaced it before the click (StaleElementReferenceException under load).
        tab_list = wait_for(
            driver,
            lambda d: d.find_element(By.CSS_SELECTOR, "#retained-list li"),
            "the tab's own retained list",
        )
        retained_filter = driver.find_element(By.ID, "retained-filter")
        retained_filter.clear()
        retained_filter.send_keys("dash/retained/#")
        retained_filter.submit()
        wait_for(driver, ec.staleness_of(tab_list), "the list for the filter")
        greeting = visible(
            driver, '#retained-list button[data-topic="dash/retained/greeting"]', "the retained topic"
        )
        assert "2 of 2" == text_of(driver, "#retained-count")
        greeting.click()
        wait_for(driver, lambda d: text_of(d, "#retained-payload") == "héllo wörld", "the payload as text")
        driver.find_element(By.ID, "view-hex").click()
        wait_for(
            driver,
            lambda d: text_of(d, "#retained-payload").startswith(
                "00000000  68 c3 a9 6c 6c 6f 20 77 c3 b6 72 6c 64"
            ),
            "the payload as hex",
        )
        driver.find_element(By.CSS_SELECTOR, '#retained-list button[data-topic="dash/retained/blob"]').click()
        wait_for(
            driver,
            lambda d: (
                text_of(d, "#retained-payload").startswith("00000000  00 01 68 69 ff")
                and text_of(d, "#retained-payload").endswith("..hi.")
            ),
            "the binary payload as hex",
        )
        assert "binary" in text_of(driver, "#retained-meta")
        screenshot(driver, tmp_path / "dashboard-retained-1280x800.png")

        # queues and cluster: says honestly what is missing, and shows /cluster/status
        tab(driver, "cluster")
        assert "Not available yet" in text_of(driver, "#tab-cluster")
        wait_for(driver, lambda d: "single-node" in text_of(d, "#cluster-status"), "the cluster status")
        # no script error and nothing the page's Content-Security-Policy refused (the session of
        # the disconnected client is a 404 the page expects, a network entry)
        errors = [
            entry
            for entry in driver.get_log("browser")
            if entry["level"] == "SEVERE"
            and (entry["source"] != "network" or "Content Security Policy" in entry["message"])
        ]
        assert errors == [], errors
    finally:
        traffic.close()
        publisher.stop()
        if watched is not None:
            watched.stop()


def test_a_wrong_token_shows_the_error_screen(browser, dashboard_node: RunningNode, tmp_path: Path) -> None:
    viewport(browser, 1280, 800)
    open_dashboard(browser, dashboard_node)
    sign_in(browser, "not-the-token")
    visible(browser, "#error", "the error screen")
    assert text_of(browser, "#error-title") == "The admin token was refused"
    assert text_of(browser, "#error-detail").startswith("401")
    assert not browser.find_element(By.ID, "app").is_displayed()
    assert browser.execute_script("return sessionStorage.getItem('fluxmq.admin.token')") is None
    screenshot(browser, tmp_path / "dashboard-wrong-token.png")
    browser.find_element(By.ID, "error-login").click()
    sign_in(browser, TOKEN)  # the way back in
    visible(browser, "#app", "the dashboard after the right token")


def test_a_stopped_node_shows_the_error_screen(browser, node_factory) -> None:
    node = node_factory(env={"FLUXMQ_ADMIN_TOKEN": TOKEN})
    viewport(browser, 1280, 800)
    open_dashboard(browser, node)
    sign_in(browser, TOKEN)
    visible(browser, "#app", "the dashboard")
    node.stop()
    visible(browser, "#error", "the error screen once /stats goes unanswered")
    assert text_of(browser, "#error-title") == "The admin API is not available"


def test_the_page_and_the_api_share_one_origin(dashboard_node: RunningNode) -> None:
    """The Host/Origin guards let the page's own calls through: a POST whose Origin is the admin
    listener's own host:port passes, another port's is refused."""
    node = dashboard_node
    own = f"127.0.0.1:{node.admin_port}"
    auth = {"Authorization": f"Bearer {TOKEN}", "Host": own}
    status, headers, _ = http_request(node, "GET", "/dashboard/", headers={"Host": own}, port=node.admin_port)
    assert status == 200 and headers["content-type"] == "text/html; charset=utf-8"
    status, _, body = http_request(
        node,
        "POST",
        "/sessions/nobody/disconnect",
        headers={**auth, "Origin": f"http://{own}"},
        port=node.admin_port,
    )
    assert status == 404, body  # past the guards: the session is simply unknown
    status, _, body = http_request(
        node,
        "POST",
        "/sessions/nobody/disconnect",
        headers={**auth, "Origin": f"http://127.0.0.1:{node.admin_port + 1}"},
        port=node.admin_port,
    )
    assert status == 403 and "cross-origin" in body["error"]


def test_head_and_conditional_requests_over_the_real_server(dashboard_node: RunningNode) -> None:
    node = dashboard_node
    status, headers, body = http_request(node, "GET", "/dashboard/dashboard.js", port=node.admin_port)
    assert status == 200 and headers["content-type"] == "text/javascript; charset=utf-8" and body
    status, again, body = http_request(
        node,
        "GET",
        "/dashboard/dashboard.js",
        headers={"If-None-Match": headers["etag"]},
        port=node.admin_port,
    )
    assert status == 304 and body == b""
    status, _, _ = http_request(node, "GET", "/dashboard/..%2F__init__.py", port=node.admin_port)
    assert status == 404
