"""The search page in a real headless Chromium: type a query, upload a photo, see result cards.

Needs the Debian packages ``chromium`` and ``chromium-driver`` (``scripts/system-deps.sh`` installs
them); skipped with that reason when they are absent. Set ``MOON_SCREENSHOT_DIR`` to keep a
screenshot of the page with its results.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()),
        reason="needs Debian chromium + chromium-driver (apt-get install -y chromium chromium-driver)",
    ),
]


@pytest.fixture
def live_server(served_index, start_server):
    from moon.serve import create_app

    index_dir, store, embedder = served_index
    server = start_server(create_app(index_dir, embedder))
    yield f"http://127.0.0.1:{server.port}", store


@pytest.fixture
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--window-size=1200,900",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def test_type_a_query_upload_a_photo_and_see_result_cards(live_server, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    url, store = live_server
    browser.get(url + "/")
    wait = WebDriverWait(browser, 30)
    wait.until(ec.text_to_be_present_in_element((By.ID, "about"), "12 products"))

    browser.find_element(By.ID, "q").send_keys("bag")
    browser.find_element(By.ID, "photo").send_keys(str(store.root / "images" / "green-bag.png"))
    browser.find_element(By.ID, "go").click()
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results .result-card")) >= 10)

    cards = browser.find_elements(By.CSS_SELECTOR, "#results .result-card")
    assert cards[0].get_attribute("data-id") == "green-bag"
    assert cards[0].find_element(By.CSS_SELECTOR, ".title").text == "green bag"
    scores = [float(c.find_element(By.CSS_SELECTOR, ".score").text) for c in cards]
    assert scores == sorted(scores, reverse=True)
    assert "multimodal query" in browser.find_element(By.ID, "status").text
    # the result images were fetched from /products/{id}/image and decoded by the browser
    wait.until(lambda d: d.execute_script("return document.querySelector('#results img.thumb').naturalWidth") == 24)

    shot = tmp_path / "search-page.png"
    browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 0
    if os.environ.get("MOON_SCREENSHOT_DIR"):
        Path(os.environ["MOON_SCREENSHOT_DIR"]).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(os.environ["MOON_SCREENSHOT_DIR"]) / shot.name)

    # an empty form is caught on the page; a request the server refuses shows its JSON message
    browser.find_element(By.ID, "q").clear()
    browser.execute_script("document.getElementById('photo').value = ''")
    browser.find_element(By.ID, "go").click()
    wait.until(ec.text_to_be_present_in_element((By.ID, "status"), "Type a query or choose a photo"))
    browser.execute_script("document.getElementById('q').value = 'x'.repeat(1001)")
    browser.find_element(By.ID, "go").click()
    wait.until(ec.text_to_be_present_in_element((By.ID, "status"), "text is 1,001 characters long; the limit is 1,000"))
