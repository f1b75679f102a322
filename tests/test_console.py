"""The web console at /ui in a real headless browser: Debian's chromium (/usr/bin/chromium, no
browser download) driven by playwright's Python package, against a real `spd serve` process with
an API key. The page loads with no console errors, asks for the key once, streams one column per
mode and strength, turns an uploaded calibration file into a job whose bar reaches 100% and whose
mode then appears in the picker, and says clearly when the key is wrong. The README's screenshot
(docs/console.png) is taken here, of the real page.

CI installs the browser (`apt-get install -y chromium`): a missing browser fails these tests. Set
SPD_SKIP_BROWSER=1 to skip them on a machine without it."""
from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest
from server.harness import CALIBRATION, REPO, Server, wait_job

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

if os.environ.get("SPD_SKIP_BROWSER") == "1":
    pytest.skip("SPD_SKIP_BROWSER=1: the headless-browser tests of the console are skipped", allow_module_level=True)

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run", "--disable-sync"]
KEY = "console-key-42"
SCREENSHOT = REPO / "docs" / "console.png"
SLOW = 300_000  # ms: generation and calibration on 2 shared cores


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # PYTHONPATH: the server imports this checkout's code (also from a worktree of an editable install)
    s = Server(tmp_path_factory.mktemp("spd-console"), api_key=KEY, env={"PYTHONPATH": str(REPO)}).start()
    try:
        with s.client() as http:  # a mode that changes greedy tokens: random rank-1 directions on many layers
            job = http.post("/v1/modes", json={"name": "rnd", "task": "math", "method": "random", "rank": 1,
                                               "layers": [0, 2, 4, 8, 12, 15, 20, 25, 29],
                                                   "calibration": {"data": CALIBRATION}}).json()
            assert wait_job(http, job["id"])["state"] == "succeeded"
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def browser():
    assert CHROMIUM.exists(), (f"{CHROMIUM} is missing: install Debian's browser with `apt-get install -y chromium` "
                               "(or set SPD_SKIP_BROWSER=1 to skip the console tests)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        yield b
        b.close()


def open_console(browser, server):
    """A fresh browser context (no stored key) on /ui, recording console errors and page errors."""
    ctx = browser.new_context(viewport={"width": 1280, "height": 820})
    page = ctx.new_page()
    page.set_default_timeout(60_000)
    page.errors = []
    page.on("console", lambda m: page.errors.append(f"{m.text} ({m.location.get('url')})") if m.type == "error" else None)
    page.on("pageerror", lambda e: page.errors.append(f"uncaught: {e}"))
    page.goto(f"{server.url}/ui")  # redirected to /ui/
    return page


@pytest.fixture(scope="module")
def page(browser, server):
    page = open_console(browser, server)
    page.fill("#auth-key", KEY)
    page.click("#auth-form button")
    page.wait_for_selector("#tabs:not([hidden])")
    yield page
    page.context.close()


def tab(page, name):
    page.click(f"nav button[data-tab={name}]")
    page.wait_for_selector(f"#tab-{name}:not([hidden])")


def test_the_console_is_public_static_files_served_by_the_server_while_the_api_needs_the_key(server):
    assert httpx.get(f"{server.url}/ui/").status_code == 200  # no key needed for the page itself
    for f in ("console.js", "console.css"):
        assert httpx.get(f"{server.url}/ui/{f}").status_code == 200
    assert httpx.get(f"{server.url}/v1/modes").status_code == 401
    with server.client() as http:  # what the page shows of a random pack: no spectrum (not a NaN)
        shown = http.get("/v1/modes/rnd")
        assert shown.status_code == 200, shown.text
        assert shown.json()["spectrum"]["0.k.g0"]["participation_ratio"] is None


def test_the_page_loads_asks_for_the_key_once_and_shows_every_tab_with_no_console_errors(page, server):
    assert page.url == f"{server.url}/ui/#playground"
    page.wait_for_selector("#play-modes input[value=rnd]")
    tab(page, "modes")
    page.wait_for_selector("#sub-table tbody tr >> text=rnd")
    tab(page, "jobs")
    page.wait_for_selector("#jobs-table tr[data-state=succeeded]")
    tab(page, "adapters")
    page.wait_for_selector("#ad-table tbody tr")
    tab(page, "playground")
    page.reload()  # the key was kept: no second prompt
    page.wait_for_selector("#tabs:not([hidden])")
    assert page.is_hidden("#auth")
    assert page.errors == []


def test_an_uploaded_calibration_file_becomes_a_job_whose_bar_reaches_100_then_a_mode_in_the_picker(page, tmp_path):
    calib = tmp_path / "calibration.jsonl"
    calib.write_text(CALIBRATION)
    tab(page, "modes")
    form = page.locator("#upload-form")
    form.locator("input[name=name]").fill("math")
    form.locator("input[name=rank]").fill("8")
    form.locator("input[name=layers]").fill("15,29")
    form.locator("input[name=file]").set_input_files(str(calib))
    form.locator("button[type=submit]").click()
    page.wait_for_selector("#upload-form .msg.ok >> text=calibrate job")
    tab(page, "jobs")
    row = page.locator("#jobs-table tr[data-job]").first  # newest first
    assert row.locator("td").nth(1).inner_text() == "calibrate"
    bar = row.locator("[role=progressbar]")
    page.wait_for_function("document.querySelector('#jobs-table tr[data-job] [role=progressbar]')"
                           ".getAttribute('aria-valuenow') === '100'", timeout=SLOW)
    assert bar.inner_text().startswith("100%")
    page.wait_for_selector("#jobs-table tr[data-job]:first-child[data-state=succeeded]", timeout=SLOW)
    tab(page, "playground")
    page.wait_for_selector("#play-modes input[value=math]")  # the picker refreshed itself when the job succeeded

    # its spectrum, and the principal angles between it and another mode
    tab(page, "modes")
    page.select_option("#spec-pack", "math")
    page.wait_for_selector("#spec-plot svg rect.sv.in")
    assert page.locator("#spec-plot svg rect.sv.in").count() == 8  # rank 8 of the first site
    page.select_option("#ang-a", "math")
    page.select_option("#ang-b", "rnd")
    page.click("#ang-run")
    page.wait_for_selector("#ang-plot svg")
    assert page.locator("#ang-plot svg rect title").count() == 4  # 15.k/v and 29.k/v, one angle each (rnd has rank 1)
    assert page.errors == []


def test_the_playground_streams_one_column_per_mode_and_strength_and_a_mode_changes_the_output(page):
    tab(page, "playground")
    page.wait_for_selector("#play-modes input[value=math]")
    page.check("#play-modes input[value=math]")
    page.check("#play-modes input[value=rnd]")
    page.fill("#play-strengths", "0.5")
    page.fill("#play-max", "48")
    page.fill("#play-prompt", "Tell me about the moon.")
    page.click("#play-run")
    # streamed: text shows in a column while it is still generating
    page.wait_for_function("[...document.querySelectorAll('.column')].some(c => c.dataset.state === 'running' "
                           "&& c.querySelector('.out').textContent.length > 0)", timeout=SLOW)
    page.wait_for_function("document.querySelectorAll('.column').length === 3 && [...document.querySelectorAll"
                           "('.column')].every(c => c.dataset.state !== 'running')", timeout=SLOW)
    cols = page.locator(".column")
    heads = [cols.nth(i).locator(".head").inner_text() for i in range(3)]
    assert heads == ["no mode", "math @ 0.5", "rnd @ 0.5"]
    outs = [cols.nth(i).locator(".out").inner_text() for i in range(3)]
    for i in range(3):
        assert cols.nth(i).get_attribute("data-state") == "done", cols.nth(i).inner_text()
        assert int(cols.nth(i).get_attribute("data-chunks")) > 1  # many deltas, not one final body
        assert "48 tokens" in cols.nth(i).locator(".foot").inner_text()
    assert outs[0].strip() and outs[2].strip() and outs[0] != outs[2], outs
    SCREENSHOT.parent.mkdir(exist_ok=True)
    box = page.locator("#play-columns").bounding_box()  # the page down to the columns' bottom edge
    page.screenshot(path=str(SCREENSHOT), clip={"x": 0, "y": 0, "width": 1280, "height": box["y"] + box["height"] + 16})

    # a raw prompt, the same way
    page.check("input[name=play-kind][value=raw]")
    page.uncheck("#play-modes input[value=math]")
    page.fill("#play-max", "8")
    page.fill("#play-prompt", "The capital of France is")
    page.click("#play-run")
    page.wait_for_function("document.querySelectorAll('.column').length === 2 && [...document.querySelectorAll"
                           "('.column')].every(c => c.dataset.state === 'done')", timeout=SLOW)
    assert page.locator(".column .out").first.inner_text().strip()
    assert page.errors == []


def test_a_wrong_api_key_says_so_clearly_and_the_right_one_then_connects(browser, server):
    page = open_console(browser, server)
    try:
        page.fill("#auth-key", "not-the-key")
        page.click("#auth-form button")
        msg = page.locator("#auth-msg")
        msg.wait_for(state="visible")
        page.wait_for_function("document.querySelector('#auth-msg').textContent.length > 0")
        assert "refused this API key" in msg.inner_text() and "401" in msg.inner_text()
        assert page.is_hidden("#tabs")
        # a stored key that stops working (rotated) asks again on the next visit, with the same message
        page.evaluate("localStorage.setItem('spd.apiKey', 'rotated-away')")
        page.reload()
        page.wait_for_function("document.querySelector('#auth-msg').textContent.includes('refused')")
        page.fill("#auth-key", KEY)
        page.click("#auth-form button")
        page.wait_for_selector("#tabs:not([hidden])")
        assert page.inner_text("#auth-msg") == ""
        # the browser reports each refused request (401) as a console error; nothing else went wrong
        assert [e for e in page.errors if "401" not in e] == []
    finally:
        page.context.close()


def test_the_pipeline_form_shows_base_self_distill_and_spd_as_bars_with_their_intervals(page):
    """The pipeline result's three arms (the shape `run_pipeline` writes, checked in test_server_jobs),
    each a bar whose length is its accuracy and whose mark spans its 95% interval."""
    tab(page, "jobs")
    arm = lambda v, lo, hi: {"metric": "accuracy", "value": v, "n": 50, "ci_low": lo, "ci_high": hi}  # noqa: E731
    job = {"id": "job-shown", "result": {
        "evaluate": {"base": arm(0.24, 0.14, 0.37), "self-distill": arm(0.41, 0.28, 0.55), "spd": arm(0.54, 0.40, 0.67)},
        "compare": {"spd-vs-self-distill": {"diff": 0.13, "ci_low": 0.02, "ci_high": 0.24, "mcnemar": {"p": 0.03}}}}}
    page.evaluate("job => renderArms(job)", job)
    bars = page.eval_on_selector_all("#pipeline-arms .arm", """rows => rows.map(r => [r.dataset.arm,
        r.querySelector('.arm-fill').style.width, r.querySelector('.arm-ci').style.left, r.querySelector('.arm-ci').style.width])""")
    assert [b[0] for b in bars] == ["base", "self-distill", "spd"]
    assert [float(b[1].rstrip("%")) for b in bars] == [24.0, 41.0, 54.0]
    assert abs(float(bars[2][2].rstrip("%")) - 40.0) < 1e-6 and abs(float(bars[2][3].rstrip("%")) - 27.0) < 1e-6
    assert "13.0 points" in page.text_content("#pipeline-arms") and page.errors == []
