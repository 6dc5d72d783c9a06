"""``cerberus view`` in a real browser: headless Chromium (Debian's ``chromium`` + ``chromium-driver``, driven by
selenium) opens the page the real server serves for a real slide result, and checks what a user sees: the page
loads without console errors, image and overlay tiles arrive, switching nuclei off changes the overlay's pixels
(and switching them back restores them), and a click on a known nucleus shows its class in the info box.

Slow (CI's bounded step); skips where Chromium or ChromeDriver is absent (``make browser`` installs them).
``CERBERUS_SAVE_SCREENSHOT=1`` also writes docs/viewer.png (the picture docs/viewer.md shows);
``CERBERUS_VIEW_RESULTS=FOLDER`` runs the same checks on an existing slide result instead (docs/viewer.png shows
the demo's: ``CERBERUS_SAVE_SCREENSHOT=1 CERBERUS_VIEW_RESULTS=demo-output/wsi``).
"""

from __future__ import annotations

import base64
import json
import os
import queue
import re
import sqlite3
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import shapely
from conftest import REPO, run_cli, slide_model

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
URL_LINE = re.compile(r"Cerberus viewer: (http://127\.0\.0\.1:\d+/)")
WINDOW = ("--input-shape", "192", "--output-shape", "128")
SCREENSHOT = REPO / "docs" / "viewer.png"

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def _missing() -> str | None:
    absent = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if absent:
        return (f"{' and '.join(absent)} not found: install Debian's chromium and chromium-driver "
                "(`make browser`, as root) to run the browser tests")
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed: pip install -e '.[dev]'"
    return None


# ---- a slide result made by the real pipeline ----------------------------------------------------------------
@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Path:
    """``cerberus infer-wsi`` of a tiny random model (4 um/px, BatchNorm statistics measured on random images, so
    it finds objects) on two small synthetic slides: a cohort folder, ``a`` (2100 x 1600 px, the one the page opens
    first) and ``b`` (or ``$CERBERUS_VIEW_RESULTS``)."""
    if reason := _missing():
        pytest.skip(reason)
    if given := os.environ.get("CERBERUS_VIEW_RESULTS"):
        return Path(given)
    from cerberus_histo.data.slide import write_synthetic_slide

    root = tmp_path_factory.mktemp("view")
    model = slide_model(root / "tiny")
    for name, w, h, seed in (("a", 2100, 1600, 2), ("b", 1400, 1100, 10)):
        write_synthetic_slide(root / f"{name}.tif", w, h, seed=seed, field=512, offset=128, n_fields=2, tile=256,
                              progress=False)
    out = root / "results"
    proc = run_cli("infer-wsi", "--model", model, "--input", root / "*.tif", "--output", out, *WINDOW)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def first_store(results: Path) -> Path:
    """The store of the item the page opens first (items are listed by name)."""
    return sorted(results.glob("*.db"))[0]


def known_nucleus(db: Path) -> dict:
    """A nucleus of the store to click: a point inside it (level-0 px; its centroid where that lies inside), its
    bounds, class and id. At that point it must be the object the server answers with, whichever rule it looks
    objects up by (nuclei first, the nearest centroid among them; or the smallest object): the smallest object
    there and, of the nuclei there, the one with the nearest centroid. The largest such nucleus, so that the click
    lands well inside it."""
    con = sqlite3.connect(db)
    try:
        rows = con.execute("SELECT geometry, properties FROM annotations WHERE geometry IS NOT NULL").fetchall()
    finally:
        con.close()
    objects = [(shapely.from_wkb(zlib.decompress(blob)), json.loads(props)) for blob, props in rows]
    objects = [(g, p) for g, p in objects if p.get("task") != "tissue"]
    best = None
    for geom, p in objects:
        if p["task"] != "nuclei" or not p.get("type") or (best is not None and geom.area <= best[0].area):
            continue
        point = geom.centroid if geom.contains(geom.centroid) else geom.point_on_surface()
        there = [(g, q) for g, q in objects if g is not geom and g.covers(point)]
        if all(g.area > geom.area for g, _ in there) and all(
                g.centroid.distance(point) > geom.centroid.distance(point) for g, q in there if q["task"] == "nuclei"):
            best = geom, p, point
    assert best is not None, "the tiny model found no nucleus that a click would pick: nothing to click"
    geom, p, point = best
    return {"x": point.x, "y": point.y, "bounds": geom.bounds, "class": p["type"], "id": p.get("id")}


# ---- the real server -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(results):
    """``cerberus view RESULTS --port 0`` as a user runs it; its URL is read from the line it prints on stderr."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "cerberus_histo", "view", str(results), "--port", "0"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    lines: queue.Queue[str | None] = queue.Queue()
    seen: list[str] = []

    def pump():
        for line in proc.stderr:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    url, deadline = None, time.monotonic() + 120
    try:
        while url is None:
            try:
                line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"`cerberus view` printed no URL in 120 s; stderr so far:\n{''.join(seen)}")
            if line is None:
                pytest.fail(f"`cerberus view` exited ({proc.wait()}) before printing its URL:\n{''.join(seen)}")
            seen.append(line)
            if m := URL_LINE.search(line):
                url = m.group(1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """Headless Chromium through chromedriver, both Debian's: selenium-manager is never asked to download."""
    if reason := _missing():
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--hide-scrollbars", "--window-size=1280,1000",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=opts)
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",  # the page itself 1280 x 800 px, as on a laptop
                           {"width": 1280, "height": 800, "deviceScaleFactor": 1, "mobile": False})
    driver.set_page_load_timeout(60)
    driver.set_script_timeout(60)
    yield driver
    driver.quit()


# ---- helpers ---------------------------------------------------------------------------------------------------
def wait_for(driver, script: str, what: str, timeout: float = 60):
    """Poll a JavaScript expression until it is truthy; on timeout say what was awaited and what the page shows."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = driver.execute_script(f"return ({script});")
        if value:
            return value
        time.sleep(0.1)
    errors = driver.execute_script("return window.cerberusViewer ? window.cerberusViewer.errors : 'no hooks'")
    pytest.fail(f"timed out after {timeout} s waiting for {what} ({script}); page errors: {errors}; console: "
                f"{console_problems(driver)}")


def console_problems(driver) -> list[str]:
    """Console messages at warning level or above, and uncaught errors, since the last call."""
    return [f"{e['level']}: {e['message']}" for e in driver.get_log("browser") if e["level"] in ("WARNING", "SEVERE")]


def responses(driver) -> list[tuple[str, int]]:
    """(URL, HTTP status) of every response since the last call, from Chromium's performance log."""
    out = []
    for entry in driver.get_log("performance"):
        msg = json.loads(entry["message"])["message"]
        if msg.get("method") == "Network.responseReceived":
            r = msg["params"]["response"]
            out.append((r["url"], int(r["status"])))
    return out


def open_page(driver, url: str) -> None:
    driver.get_log("browser"), driver.get_log("performance")  # start from empty logs
    driver.get(url)
    wait_for(driver, "window.cerberusViewer && window.cerberusViewer.overlayReady", "the first overlay", 90)


def viewer_pixels(driver) -> np.ndarray:
    """What the viewer draws (image and overlay, BGR) once every visible tile is in: OpenSeadragon's canvas,
    without the navigation buttons and the navigator, which fade and move on their own."""
    wait_for(driver, "window.cerberusViewer.image.getFullyLoaded() && window.cerberusViewer.overlayReady",
             "every visible tile")
    url = driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "requestAnimationFrame(() => requestAnimationFrame(() => "
        "done(window.cerberusViewer.viewer.drawer.canvas.toDataURL('image/png'))));")
    png = base64.b64decode(url.split(",", 1)[1])
    return cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)


def changed(a: np.ndarray, b: np.ndarray) -> float:
    """Share of pixels that differ visibly between two pictures of the same size."""
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((np.abs(a.astype(np.int16) - b.astype(np.int16)).max(axis=2) > 24).mean())


def set_checkbox(driver, element_id: str, checked: bool) -> None:
    from selenium.webdriver.common.by import By

    box = driver.find_element(By.ID, element_id)
    if box.is_selected() != checked:
        box.click()
    assert box.is_selected() == checked


# ---- the tests -------------------------------------------------------------------------------------------------
def test_page_loads_with_image_and_overlay_tiles(browser, server, results):
    from selenium.webdriver.common.by import By

    open_page(browser, server)
    got = responses(browser)
    failed = [(u, s) for u, s in got if s >= 400]
    assert not failed, f"failed requests: {failed}"
    image = [u for u, s in got if "/image_files/" in u and u.endswith(".jpeg")]
    overlay = [u for u, s in got if "/overlay_files/" in u and ".png" in u]
    assert image and overlay, f"no image or overlay tile was fetched: {got}"
    assert all(u.startswith(server) for u, _ in got), "the page fetched something from another host"
    hooks = browser.execute_script("const h = window.cerberusViewer; return [h.imageTiles, h.overlayTiles, "
                                   "h.item.name, h.errors, document.body.dataset.state];")
    stem = first_store(results).stem
    assert hooks[0] > 0 and hooks[1] > 0 and hooks[2] == stem and hooks[3] == [] and hooks[4] == "ready", hooks
    # the panel: a switch per task and per class (with its count), the summary tables
    tasks = browser.execute_script("return window.cerberusViewer.item.tasks")
    assert {t["task"] for t in tasks} == {"gland", "lumen", "nuclei", "tissue"}, tasks
    for t in tasks:
        assert browser.find_element(By.ID, f"toggle-{t['task']}").is_selected()
        for c in t["classes"]:
            row = browser.find_element(By.CSS_SELECTOR, f"input[data-task='{t['task']}'][data-class='{c['name']}']")
            assert row.is_selected() and f"{c['count']:,}" in row.find_element(By.XPATH, "../..").text
    summary = browser.find_element(By.ID, "summary").text
    assert "Objects" in summary and "Tissue" in summary and "Nuclei per tissue class" in summary, summary
    assert console_problems(browser) == []


def test_switching_nuclei_off_changes_the_overlay(browser, server):
    open_page(browser, server)
    before = viewer_pixels(browser)
    set_checkbox(browser, "toggle-nuclei", False)
    wait_for(browser, "window.cerberusViewer.overlayReady && window.cerberusViewer.hide === 'nuclei'",
             "the overlay without nuclei")
    hidden = viewer_pixels(browser)
    share = changed(before, hidden)
    assert share > 0.002, f"switching nuclei off changed only {share:.4%} of the viewer's pixels"
    assert any("hide=nuclei" in u for u, _ in responses(browser)), "no overlay tile was fetched without nuclei"
    # a class switch leaves the task on; switching the task back on restores the first picture
    set_checkbox(browser, "toggle-nuclei", True)
    wait_for(browser, "window.cerberusViewer.overlayReady && window.cerberusViewer.hide === ''",
             "the overlay with nuclei again")
    share = changed(before, viewer_pixels(browser))
    assert share < 0.001, f"switching nuclei back on left {share:.4%} of the pixels changed"
    # the opacity slider fades the overlay without fetching anything
    browser.execute_script("const s = document.getElementById('opacity'); s.value = 0; "
                           "s.dispatchEvent(new Event('input'));")
    assert browser.execute_script("return window.cerberusViewer.overlay.getOpacity()") == 0
    assert console_problems(browser) == []


def test_click_on_a_nucleus_shows_its_class(browser, server, results):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    nucleus = known_nucleus(first_store(results))
    open_page(browser, server)
    x0, y0, x1, y1 = nucleus["bounds"]
    pad = max(x1 - x0, y1 - y0, 64)
    browser.execute_script("window.cerberusViewer.showRegion(...arguments)", x0 - pad, y0 - pad, x1 - x0 + 2 * pad,
                           y1 - y0 + 2 * pad)
    wait_for(browser, "window.cerberusViewer.overlay.getFullyLoaded()", "the zoomed overlay")
    viewer = browser.find_element(By.ID, "viewer")
    at = browser.execute_script("return window.cerberusViewer.imageToElement(...arguments)", nucleus["x"],
                                nucleus["y"])
    size = viewer.size
    ActionChains(browser).move_to_element_with_offset(viewer, round(at["x"] - size["width"] / 2),
                                                      round(at["y"] - size["height"] / 2)).click().perform()
    wait_for(browser, "document.getElementById('object-info').dataset.state === 'object'", "the clicked object")
    info = browser.find_element(By.ID, "object-info")
    assert info.get_attribute("data-task") == "nuclei", info.text
    assert info.get_attribute("data-class") == nucleus["class"], info.text
    assert nucleus["class"] in info.text and "µm²" in info.text, info.text
    assert browser.execute_script("return window.cerberusViewer.lastObject.id") == nucleus["id"], info.text
    assert console_problems(browser) == []
    if os.environ.get("CERBERUS_SAVE_SCREENSHOT") == "1":  # the clicked nucleus amid its neighbours, about 1:1
        browser.execute_script("window.cerberusViewer.showRegion(...arguments)", nucleus["x"] - 450,
                               nucleus["y"] - 400, 900, 800)
        time.sleep(1)
        wait_for(browser, "window.cerberusViewer.image.getFullyLoaded() && "
                 "window.cerberusViewer.overlay.getFullyLoaded()", "the tiles around the nucleus")
        time.sleep(0.5)
        save_screenshot(browser.get_screenshot_as_png(), SCREENSHOT)


def save_screenshot(png: bytes, path: Path) -> None:
    """The page as a 256-colour PNG (docs stay small: about a third of the full-colour file)."""
    import io

    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("RGB")
    image.quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(path, optimize=True)


def test_picker_switches_between_the_slides_of_a_cohort(browser, server):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    open_page(browser, server)
    items = browser.execute_script("return fetch('/api/items').then(r => r.json()).then(d => d.items)")
    if len(items) < 2:
        pytest.skip("the result viewed holds one item: no picker")
    assert browser.find_element(By.ID, "item-picker").is_displayed()
    picker = Select(browser.find_element(By.ID, "item-select"))
    assert [o.get_attribute("value") for o in picker.options] == [it["id"] for it in items]
    responses(browser)
    picker.select_by_value(items[1]["id"])
    wait_for(browser, f"window.cerberusViewer.item.id === {json.dumps(items[1]['id'])} && "
             "window.cerberusViewer.overlayReady && window.cerberusViewer.image.getFullyLoaded()",
             "the second item")
    got = responses(browser)
    prefix = f"{server}api/items/{items[1]['id']}/"
    assert any(u.startswith(prefix + "image_files/") for u, _ in got), got
    assert any(u.startswith(prefix + "overlay_files/") for u, _ in got), got
    assert not [(u, s) for u, s in got if s >= 400]
    assert browser.find_element(By.ID, "item-name").text == items[1]["name"]
    # the address keeps the choice: a reload comes back to the same item
    assert browser.current_url.endswith(f"#item={items[1]['id']}")
    browser.refresh()
    wait_for(browser, "window.cerberusViewer && window.cerberusViewer.overlayReady", "the page again")
    assert browser.execute_script("return window.cerberusViewer.item.id") == items[1]["id"]
    assert console_problems(browser) == []
