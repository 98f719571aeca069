"""The discovery dashboard in a real browser (issue 21): headless Chromium (Debian's ``chromium`` and
``chromium-driver``, driven by Selenium) opens the page of a token-protected discovery server while a
student trains, is asked for the token once, and shows the student's wait fraction and its
teacher's rows/s within seconds of the epoch's start, updating without a reload.

``DISTILL_DASHBOARD_SCREENSHOT=path.png`` also saves a screenshot there (docs/dashboard.png is one).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest
from test_fleet_view import TOKEN, discover_config, running, student

from distill_reader.discovery.server import ServerThread
from distill_reader.security import Secret

pytestmark = pytest.mark.timeout(120)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver") or (
    "/usr/bin/chromedriver" if Path("/usr/bin/chromedriver").exists() else None
)


@pytest.fixture
def browser():
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("selenium is not installed (pip install -e '.[test]')")
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip("chromium and chromium-driver are not installed (bash scripts/install-services.sh)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="distill-chromium-")
    for arg in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--window-size=1366,900",  # a laptop screen
        f"--user-data-dir={profile}",
    ):
        options.add_argument(arg)
    # The driver Debian ships, never one downloaded (Selenium Manager is not asked: the path is given).
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def test_the_dashboard_shows_a_training_students_wait_and_its_teachers_rows_per_second(
    browser, write_config, teachers, tmp_path
):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    with running(ServerThread(http="127.0.0.1:0", token=Secret(TOKEN))) as discovery:
        token_file = tmp_path / "discovery.token"
        token_file.write_text(TOKEN + "\n")
        register = ("--register", discovery.address, "--service-name", "tagger", "--token-file", str(token_file))
        teacher = teachers.start("reader_models:slow_tag", *register)
        config = discover_config(write_config, discovery.address, require_num=1, extra=f"token_file = {token_file}")
        # The page is open (and has the token) before the student starts: what it shows comes live.
        browser.get(f"http://{discovery.http_address}/")
        login = WebDriverWait(browser, 10).until(lambda d: d.find_element(By.ID, "login"))
        WebDriverWait(browser, 10).until(lambda d: login.is_displayed())  # asked for the token (401)
        browser.find_element(By.ID, "token").send_keys(TOKEN)
        browser.find_element(By.CSS_SELECTOR, "#login button").click()
        WebDriverWait(browser, 10).until(lambda d: d.find_element(By.CSS_SELECTOR, f'[data-teacher="{teacher}"]'))
        browser.execute_script("window.__noReload = 'still the same page';")
        learner = student(config).start()
        try:
            row = f'[data-student="{learner.id}"]'

            def read(driver, selector: str) -> tuple[str | None, str | None]:
                """An element's data-value and text, read at once (the page redraws its rows every second)."""
                return tuple(
                    driver.execute_script(
                        "const e = document.querySelector(arguments[0]);"
                        "return e ? [e.dataset.value ?? null, e.textContent] : [null, null];",
                        selector,
                    )
                )

            def shown(driver) -> tuple[float, float] | None:
                w, _ = read(driver, f"{row} .wait-fraction")
                r, _ = read(driver, f'[data-teacher="{teacher}"] .rows-per-s')
                # The teacher takes 20 ms a request, the loop nothing: the loop mostly waits.
                if w in (None, "") or r in (None, "") or float(r) <= 0 or float(w) <= 0.3:
                    return None
                return float(w), float(r)

            wait_fraction, rows_per_s = WebDriverWait(browser, 20, poll_frequency=0.1).until(shown)
            seen_after = time.monotonic() - learner.first_epoch_at
            assert learner.error is None
            assert 0.3 < wait_fraction <= 1 and rows_per_s > 0
            assert seen_after < 10, f"shown {seen_after:.1f} s after the epoch started"
            # What the page shows is what the server says, as text a person reads.
            _, text = read(browser, f"{row} .wait-fraction")
            assert text.endswith("%") and 0 <= int(text.rstrip("%")) <= 100
            # It keeps updating without a reload (and the token was asked for once).
            updates = int(browser.execute_script("return document.body.dataset.updates"))
            WebDriverWait(browser, 10).until(
                lambda d: int(d.execute_script("return document.body.dataset.updates")) >= updates + 2
            )
            assert browser.execute_script("return window.__noReload") == "still the same page"
            assert not browser.find_element(By.ID, "login").is_displayed()
            assert browser.execute_script("return sessionStorage.getItem('distillDiscoveryToken')") == TOKEN
            # Its chart has points: the history the server keeps.
            WebDriverWait(browser, 10).until(lambda d: d.find_elements(By.CSS_SELECTOR, f"{row} svg.spark polyline"))
            # Nothing came from anywhere but the server (no CDN): every resource is same-origin.
            origins = browser.execute_script(
                "return performance.getEntriesByType('resource').map(e => new URL(e.name).origin)"
            )
            assert set(origins) <= {f"http://{discovery.http_address}"}
            shot = os.environ.get("DISTILL_DASHBOARD_SCREENSHOT")
            if shot:
                time.sleep(float(os.environ.get("DISTILL_DASHBOARD_SCREENSHOT_AFTER", "0")))
                browser.save_screenshot(shot)
        finally:
            learner.close()
        assert learner.error is None
