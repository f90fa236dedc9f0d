"""The live page in a real headless Chromium (Debian's chromium and chromedriver, driven by Selenium), and the
events it reads, against a gateway in front of the fake upstream."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from prometheus_client import CollectorRegistry
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver

from app.api.snapshot import LISTED, snapshot
from app.metrics import Metrics
from app.types import INTERACTIVE, Priority
from testkit.gateway import Background, RunningGateway, chat_body, wait_until
from testkit.upstream import FakeUpstream
from tests.queue.test_scheduler import make

StartGateway = Callable[..., RunningGateway]
ROOT = Path(__file__).resolve().parent.parent.parent
SCREENSHOT = ROOT / "tests" / "artifacts" / "dashboard.png"  # written by every run (git ignores it)


def _binary(*names: str) -> str:
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    pytest.fail(f"none of {names} is installed: apt-get install chromium chromium-driver (make test does)")


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    options = Options()
    options.binary_location = _binary("chromium", "chromium-browser", "google-chrome")
    # Headless, with nothing reaching out to the network (this machine's network is closed).
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1400,1100",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(_binary("chromedriver")), options=options)
    try:
        yield driver
    finally:
        driver.quit()


# Read in one script: the page redraws its parts at every snapshot, so an element found by one WebDriver
# call may be gone by the next.
def text(driver: WebDriver, element_id: str) -> str:
    return str(driver.execute_script("return document.getElementById(arguments[0]).textContent", element_id))


def first_text(driver: WebDriver, selector: str) -> str | None:
    script = "const e = document.querySelector(arguments[0]); return e ? e.textContent : null"
    found = driver.execute_script(script, selector)
    return None if found is None else str(found)


def listed(driver: WebDriver) -> set[str]:
    script = "return [...document.querySelectorAll('tr[data-request]')].map(row => row.dataset.request)"
    return set(driver.execute_script(script))


def click(driver: WebDriver, selector: str) -> None:
    driver.execute_script("document.querySelector(arguments[0]).click()", selector)


def console_errors(driver: WebDriver) -> list[dict[str, Any]]:
    return [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def test_the_page_shows_the_queue_move_and_cancels_a_waiting_request(
    start_gateway: StartGateway, upstream: FakeUpstream, browser: WebDriver
) -> None:
    gw = start_gateway(max_concurrent_requests=1)
    url = gw.url + "/v1/chat/completions"
    browser.get(gw.url + "/dashboard")
    assert wait_until(lambda: text(browser, "state") == "live", timeout=10)
    assert text(browser, "waiting") == "0 / 100" and text(browser, "in-flight") == "0 / 1"
    upstream.behavior.hang = True
    with Background() as background:
        running = background.post(url, chat_body("runs"), headers={"X-Request-ID": "running-one"})
        assert wait_until(lambda: upstream.active == 1)
        waiting = {
            name: background.post(url, chat_body(name), headers={"X-Request-ID": name, "X-Priority": priority})
            for name, priority in (("w-low", "low"), ("w-normal", "normal"), ("w-high", "high"))
        }
        assert wait_until(lambda: listed(browser) == set(waiting), timeout=10)
        assert text(browser, "waiting") == "3 / 100" and text(browser, "in-flight") == "1 / 1"
        assert first_text(browser, "[data-slot=busy] .id") == "running-one"
        assert first_text(browser, "[data-level=high] tr[data-request=w-high] td") == "1"  # its position
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(SCREENSHOT))

        click(browser, "button[data-cancel=w-normal]")
        assert waiting["w-normal"].result().status_code == 499  # its client learns it was cancelled
        assert wait_until(lambda: listed(browser) == {"w-low", "w-high"}, timeout=10)

        upstream.behavior.hang = False
        assert httpx.delete(gw.url + "/v1/queue/request/running-one").status_code == 200
        assert running.result().status_code == 499
        assert waiting["w-high"].result().status_code == 200 and waiting["w-low"].result().status_code == 200
    assert wait_until(lambda: text(browser, "completed") == "2" and not listed(browser), timeout=10)
    assert wait_until(lambda: text(browser, "waiting") == "0 / 100", timeout=10)
    assert console_errors(browser) == []


def test_with_keys_a_key_sees_its_own_requests_and_an_admin_sees_all(
    start_gateway: StartGateway, upstream: FakeUpstream, browser: WebDriver, tmp_path: Path
) -> None:
    keys = tmp_path / "keys.yaml"
    keys.write_text(
        "keys:\n  - {key: alice-key, name: alice}\n  - {key: bob-key, name: bob}\n"
        "  - {key: root-key, name: root, admin: true}\n"
    )
    gw = start_gateway(api_keys_file=str(keys), max_concurrent_requests=1)
    url = gw.url + "/v1/chat/completions"
    assert httpx.get(gw.url + "/v1/queue/events").status_code == 401
    upstream.behavior.hang = True
    with Background() as background:
        bob = {"Authorization": "Bearer bob-key"}
        blocker = background.post(url, chat_body(), headers={**bob, "X-Request-ID": "bob-running"})
        assert wait_until(lambda: upstream.active == 1)
        alices = background.post(url, chat_body(), headers={"Authorization": "Bearer alice-key", "X-Request-ID": "a1"})
        bobs = background.post(url, chat_body(), headers={**bob, "X-Request-ID": "b1"})
        assert wait_until(lambda: gw.scheduler.waiting == 2)

        browser.get(gw.url + "/dashboard")
        browser.execute_script("sessionStorage.clear()")
        browser.get(gw.url + "/dashboard")
        assert browser.find_element(By.ID, "key-form").is_displayed()  # it asks before it reads anything
        browser.find_element(By.ID, "key").send_keys("alice-key")
        browser.find_element(By.CSS_SELECTOR, "#key-form button").click()
        assert wait_until(lambda: text(browser, "state") == "live", timeout=10)
        assert wait_until(lambda: listed(browser) == {"a1"}, timeout=10)  # bob's waiting one is only counted
        assert text(browser, "waiting") == "2 / 100" and text(browser, "viewer") == "as alice"
        assert first_text(browser, "[data-slot=busy] .id") == "(another key)"

        browser.find_element(By.ID, "forget").click()
        assert wait_until(lambda: browser.find_element(By.ID, "key-form").is_displayed(), timeout=10)
        browser.find_element(By.ID, "key").send_keys("root-key")
        browser.find_element(By.CSS_SELECTOR, "#key-form button").click()
        assert wait_until(lambda: listed(browser) == {"a1", "b1"}, timeout=10)
        assert text(browser, "viewer") == "as root (admin)"
        click(browser, "button[data-cancel=b1]")  # an admin cancels anyone's
        assert bobs.result().status_code == 499
        upstream.behavior.hang = False
        assert httpx.delete(gw.url + "/v1/queue/request/bob-running", headers=bob).status_code == 200
        assert blocker.result().status_code == 499 and alices.result().status_code == 200
    assert console_errors(browser) == []


def test_the_events_are_snapshots_sent_on_change_and_every_second(
    start_gateway: StartGateway, upstream: FakeUpstream
) -> None:
    gw = start_gateway(max_concurrent_requests=2)
    snapshots: list[tuple[float, dict[str, Any]]] = []
    with httpx.stream("GET", gw.url + "/v1/queue/events", timeout=10) as events:
        assert events.headers["content-type"].startswith("text/event-stream")
        for line in events.iter_lines():
            if not line.startswith("data: "):
                continue
            snapshots.append((time.monotonic(), orjson.loads(line[6:])))
            if len(snapshots) == 1:
                assert httpx.post(gw.url + "/v1/chat/completions", json=chat_body()).status_code == 200
            if len(snapshots) == 4:
                break
    first, later = snapshots[0][1], [s for _, s in snapshots[1:]]
    assert first["queue"] == {
        "waiting": 0,
        "by_priority": {"high": 0, "normal": 0, "low": 0, "batch": 0},
        "max_queue_size": 100,
        "in_flight": 0,
        "max_concurrent": 2,
    }
    assert later[0]["totals"]["completed"] == 1  # the change, at once
    assert snapshots[3][0] - snapshots[2][0] < 1.6  # unchanged: still at least every second
    assert [slot["busy"] for slot in first["backends"][0]["slots"]] == [False, False]
    assert set(first["history"]) == {"at", "high", "normal", "low", "batch", "wait_p50", "wait_p95"}


def test_the_events_end_once_a_drain_has_nothing_left_running(start_gateway: StartGateway) -> None:
    gw = start_gateway()
    seen: list[dict[str, Any]] = []
    with httpx.stream("GET", gw.url + "/v1/queue/events", timeout=10) as events:
        for line in events.iter_lines():
            if line.startswith("data: "):
                seen.append(orjson.loads(line[6:]))
                if len(seen) == 1:
                    assert gw.loop is not None
                    gw.loop.call_soon_threadsafe(gw.scheduler.drain)
    assert seen[0]["running"] is True and seen[-1]["running"] is False  # and then the stream ended


@pytest.mark.anyio
async def test_a_snapshot_with_ten_thousand_waiting_lists_the_first_few_hundred_per_level() -> None:
    scheduler, _, _ = make(concurrency=1, queue=20_000)
    levels = list(INTERACTIVE)
    for n in range(10_001):
        scheduler.submit(f"r{n}", "chat", levels[n % 3], None)
    view = snapshot(scheduler, Metrics(CollectorRegistry()), None)
    assert view["queue"]["waiting"] == 10_000
    for name, data in view["waiting"].items():
        if name == Priority.BATCH:
            assert data["count"] == 0
            continue
        assert data["count"] > 3000 and len(data["requests"]) == LISTED, name
    high = view["waiting"]["high"]["requests"]
    assert [r["position"] for r in high[:3]] == [1, 2, 3]
    assert view["waiting"]["normal"]["requests"][0]["position"] == view["waiting"]["high"]["count"] + 1
    scheduler.close()
