"""The status page in a real headless browser (Debian's chromium through Selenium): a synthetic
study processed end to end by the embedded worker with the micro bundle, then the page loaded
with the node's password sent as the browser would, checked for the study, its job and every
present finding with a decoded key-image thumbnail, and saved as a screenshot."""

from __future__ import annotations

import base64
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from test_metrics import Processed, process_study
from test_worker import build_micro_bundle

PASSWORD = "browser-secret"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


@pytest.fixture(scope="session")
def micro_bundle(tmp_path_factory: pytest.TempPathFactory, request: Any) -> Path:
    return build_micro_bundle(tmp_path_factory, request)  # built once per session, on disk


@pytest.fixture(scope="module")
def processed(tmp_path_factory: pytest.TempPathFactory, micro_bundle: Path) -> Iterator[Processed]:
    yield from process_study(
        tmp_path_factory.mktemp("browser"), micro_bundle, http_password=PASSWORD
    )


@pytest.fixture
def browser() -> Iterator[webdriver.Chrome]:
    assert Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists(), (
        "needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)"
    )
    options = Options()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",  # CI containers run as root
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1400,1000",
        "--hide-scrollbars",
    ):
        options.add_argument(arg)
    # An explicit driver path: Selenium Manager would otherwise try to download one.
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.mark.slow
@pytest.mark.integration
def test_status_page_in_chromium(
    processed: Processed, browser: webdriver.Chrome, tmp_path: Path
) -> None:
    node, job = processed.node, processed.job
    assert job.result is not None
    present = [f for f in job.result["findings"] if f["present"]]
    assert len(present) == 9  # the micro bundle's always-present labels
    url = f"http://127.0.0.1:{node.http_port}/"

    # Without the password the browser gets the 401 page, not the status.
    browser.get(url)
    assert processed.series.study_uid not in browser.page_source

    # With it, as every request of the page (thumbnails too) carries it.
    token = base64.b64encode(f"operator:{PASSWORD}".encode()).decode()
    browser.execute_cdp_cmd("Network.enable", {})
    browser.execute_cdp_cmd(
        "Network.setExtraHTTPHeaders", {"headers": {"Authorization": f"Basic {token}"}}
    )
    browser.get(url)
    assert browser.title.endswith("status")

    studies = browser.find_element(By.ID, "studies").text
    assert processed.series.study_uid in studies
    assert "done" in studies and "(24 images)" in studies

    jobs = browser.find_element(By.ID, "jobs").text
    assert processed.series.series_uid in jobs
    assert f"9 of {len(job.result['findings'])} present" in jobs
    assert "infer" in jobs and "send" in jobs  # stage timings

    findings = browser.find_element(By.ID, "findings")
    cards = findings.find_elements(By.CSS_SELECTOR, ".finding")
    labels = [c.find_element(By.CSS_SELECTOR, ".label").text for c in cards]
    assert sorted(labels) == sorted(f["label"] for f in present)
    # Every key image is a thumbnail the browser fetched and decoded.
    browser.execute_script("window.scrollTo(0, document.body.scrollHeight)")  # lazy images
    images = findings.find_elements(By.TAG_NAME, "img")
    assert len(images) == len(present)
    for img in images:
        browser.execute_script("arguments[0].scrollIntoView(); return arguments[0].decode()", img)
        width = browser.execute_script("return arguments[0].naturalWidth", img)
        assert width == 64, img.get_attribute("src")  # the 64-pixel phantom slice
    sources = {(img.get_attribute("src") or "").rsplit("/", 1)[-1] for img in images}
    assert sources == {f"{f['key_sop_instance_uid']}.png" for f in present}

    assert "CTRL1" in browser.find_element(By.ID, "hl7").text
    outbox = browser.find_element(By.ID, "outbox").text
    assert outbox.count("sent") >= 2
    # The stylesheet applied (the CSP allows it): the header is dark.
    header_bg = browser.find_element(By.TAG_NAME, "header").value_of_css_property(
        "background-color"
    )
    assert header_bg in ("rgba(29, 36, 48, 1)", "rgb(29, 36, 48)")

    # A screenshot of the whole page.
    height = browser.execute_script("return document.documentElement.scrollHeight")
    browser.set_window_size(1400, min(int(height) + 40, 6000))
    browser.execute_script("window.scrollTo(0, 0)")
    shot = tmp_path / "status-page.png"
    assert browser.save_screenshot(str(shot))
    with Image.open(shot) as picture:
        assert picture.width >= 1000 and picture.height >= 800
        assert np.unique(np.asarray(picture.convert("L"))).size > 16  # not a blank page
