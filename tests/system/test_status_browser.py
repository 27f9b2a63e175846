"""The status page in a real browser: Debian's headless Chromium, driven by selenium through
Debian's chromedriver. After skopeo pulls an image from a real docker-registry through the proxy
twice (cold, then warm), the page shows the image with one pull fetched and one from the cache,
and its byte counts are those /metrics reports. A screenshot is written beside the test's files
(and to $OCICACHE_ARTEFACTS, if set) for people to look at."""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver

from proxy.web.metrics import FROM_CACHE, FROM_UPSTREAM
from proxy.web.status import human_bytes
from tests.conftest import StartProxy
from tests.support.images import make_image, push_image
from tests.support.registry import Registry
from tests.system.test_clients import run_tool

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[WebDriver]:
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
        "--window-size=1280,2200",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):
        options.add_argument(flag)
    # The driver Debian ships beside its chromium: selenium then never looks for one to download.
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def served(metrics_text: str) -> tuple[dict[str, float], dict[str, float]]:
    """Requests and body bytes by cache result, summed over the other labels."""
    requests: dict[str, float] = {}
    sent: dict[str, float] = {}
    for family in text_string_to_metric_families(metrics_text):
        into = {"ocicache_requests": requests, "ocicache_served_bytes": sent}.get(family.name)
        if into is None:
            continue
        for sample in family.samples:
            if sample.name.endswith("_total"):
                cache = sample.labels["cache"]
                into[cache] = into.get(cache, 0.0) + sample.value
    return requests, sent


async def test_status_page_after_a_cold_and_a_warm_pull(
    start_proxy: StartProxy,
    registry: Registry,
    session: aiohttp.ClientSession,
    browser: WebDriver,
    tmp_path: Path,
) -> None:
    image = make_image(layer_sizes=(300_000, 40_000), seed=1101)
    await push_image(session, registry.url, "library/app", image, tag="v1")
    proxy = await start_proxy({"docker.io": registry.url})
    for attempt in ("cold", "warm"):
        argv = ["skopeo", "copy", "--src-tls-verify=false"]
        argv += [f"docker://{proxy.host}/library/app:v1", f"oci:{tmp_path / attempt}"]
        code, out = await run_tool(*argv, env=dict(os.environ))
        assert code == 0, out
        await proxy.cached()

    async with session.get(f"{proxy.url}/metrics") as resp:
        requests, sent = served(await resp.text())
    assert requests["hit"] >= 1 and requests["miss"] >= 1

    def look() -> dict[str, object]:
        browser.get(proxy.url + "/")
        rows = [
            r
            for r in browser.find_elements(By.CSS_SELECTOR, "#images tr.image")
            if "library/app:v1" in r.text
        ]
        assert len(rows) == 1, browser.page_source
        row = rows[0]
        shot = tmp_path / "status-page.png"
        browser.save_screenshot(str(shot))
        found = {
            "reference": row.find_element(By.TAG_NAME, "code").text,
            "hits": row.find_element(By.CSS_SELECTOR, "td.hits").text,
            "misses": row.find_element(By.CSS_SELECTOR, "td.misses").text,
            "shot": shot,
            "title": browser.title,
            "svg": len(browser.find_elements(By.CSS_SELECTOR, "#chart svg rect")),
        }
        for key in ("bytes-cached", "bytes-served", "bytes-upstream"):
            cell = browser.find_element(By.ID, key)
            found[key] = (int(cell.get_attribute("data-bytes") or -1), cell.text)
        for result in ("hit", "miss"):
            found[f"requests-{result}"] = browser.find_element(By.ID, f"requests-{result}").text
        return found

    page = await asyncio.to_thread(look)
    assert page["title"] == "ocicache status"
    assert page["reference"] == "docker.io/library/app:v1"
    assert (page["misses"], page["hits"]) == ("1", "1")  # one pull fetched, one from the cache
    cached = int(sum(sent.get(r, 0.0) for r in FROM_CACHE))
    everything = int(sum(sent.get(r, 0.0) for r in FROM_CACHE | FROM_UPSTREAM))
    assert page["bytes-cached"] == (cached, human_bytes(cached))
    assert page["bytes-served"] == (everything, human_bytes(everything))
    assert cached > 0 and everything > cached
    assert page["requests-hit"] == str(int(requests["hit"]))
    assert page["requests-miss"] == str(int(requests["miss"]))
    assert isinstance(page["svg"], int) and page["svg"] > 0
    shot = page["shot"]
    assert isinstance(shot, Path) and shot.read_bytes().startswith(b"\x89PNG")
    artefacts = os.environ.get("OCICACHE_ARTEFACTS")
    if artefacts:
        shutil.copy(shot, Path(artefacts) / "status-page.png")
