"""The web page end to end in a real headless Chromium (Debian's, driven by Playwright; no browser download): upload
a real cell image through the page's file input, check that the label and confidence shown are the API's, toggle the
heatmap, download the CSV report; then a whole field shows its cell boxes."""

from __future__ import annotations

import csv
import io
import shutil

import httpx
import pytest

pytestmark = pytest.mark.browser

ALL_SETTLED = ("() => document.querySelectorAll('.result').length > 0 && "
               "[...document.querySelectorAll('.result')].every(e => e.dataset.status !== 'pending')")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"]


@pytest.fixture(scope="module")
def browser():
    exe = shutil.which("chromium")
    if exe is None:
        pytest.fail("Chromium was not found on PATH (looked for 'chromium'); run setup.sh, which installs Debian's "
                    "chromium package, or `sudo apt-get install chromium`")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


@pytest.fixture()
def console_errors() -> list[str]:
    """JavaScript exceptions and console errors of the page; a test removes those it expects."""
    return []


@pytest.fixture()
def page(browser, live_server, console_errors):
    context = browser.new_context(accept_downloads=True)
    pg = context.new_page()
    errors = console_errors
    pg.on("pageerror", lambda exc: errors.append(str(exc)))
    pg.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    requests: list[str] = []
    pg.on("request", lambda req: requests.append(req.url))
    pg.goto(live_server + "/")
    pg.wait_for_selector("#model-select option", state="attached")
    yield pg
    assert not errors, f"the page logged errors: {errors}"
    assert all(u.startswith(live_server) or u.startswith(("data:", "blob:")) for u in requests), requests
    context.close()


def test_upload_cell_shows_api_answer_and_toggles_heatmap(page, live_server, cell_paths):
    path = cell_paths[0]
    api = httpx.post(live_server + "/v1/predict", files={"file": (path.name, path.read_bytes(), "image/tiff")},
                     timeout=60).json()
    assert page.input_value("#model-select") == "main"
    page.set_input_files("#file-input", str(path))
    card = page.locator(".result").first
    page.wait_for_function(ALL_SETTLED, timeout=60_000)
    assert card.get_attribute("data-status") == "done", card.locator(".status").inner_text()
    assert card.get_attribute("data-mode") == "cell"
    assert card.locator(".filename").inner_text() == path.name
    assert card.locator(".label").inner_text() == api["label"]
    assert card.locator(".confidence").inner_text() == f"{100 * api['confidence']:.1f}%"
    assert float(card.get_attribute("data-confidence")) == pytest.approx(api["confidence"], abs=1e-6)
    assert float(card.locator(".bar").get_attribute("aria-valuenow")) == pytest.approx(100 * api["confidence"],
                                                                                      abs=0.06)
    # the card shows the heatmap caution exactly when the API's faithfulness verdict for this image is not "passes"
    verdict = httpx.post(live_server + "/v1/explain", files={"file": (path.name, path.read_bytes(), "image/tiff")},
                         data={"model": "main"}, timeout=60).json()["faithfulness"]["verdict"]
    assert card.locator(".faithfulness").is_hidden() is (verdict == "passes"), verdict
    # The heatmap is shown first; the toggle switches to the plain image and back.
    img = card.locator("img.view")
    toggle = card.locator(".heatmap-toggle")
    assert toggle.is_visible() and toggle.is_checked()
    assert card.get_attribute("data-view") == "overlay"
    with_heat = img.get_attribute("src")
    assert with_heat.startswith("data:image/png;base64,")
    toggle.uncheck()
    assert card.get_attribute("data-view") == "image"
    plain = img.get_attribute("src")
    assert plain.startswith("data:image/png;base64,") and plain != with_heat
    page.wait_for_function("() => document.querySelector('img.view').complete")
    assert page.evaluate("() => document.querySelector('img.view').naturalWidth") == 257  # the TIFF, decoded
    toggle.check()
    assert img.get_attribute("src") == with_heat
    # The session report.
    assert "1 done" in page.inner_text("#summary")
    with page.expect_download() as dl:
        page.click("#download-csv")
    rows = list(csv.DictReader(io.StringIO(open(dl.value.path(), encoding="utf-8").read())))
    assert len(rows) == 1 and rows[0]["file"] == path.name and rows[0]["label"] == api["label"]
    assert float(rows[0]["confidence"]) == pytest.approx(api["confidence"], abs=1e-6)
    with page.expect_download() as dl:
        page.click("#download-html")
    html = open(dl.value.path(), encoding="utf-8").read()
    assert path.name in html and api["label"] in html and "data:image/png;base64," in html


def test_heatmap_caution_shows_when_the_method_did_not_pass(page, live_server, cell_paths):
    """The API's faithfulness verdict, turned to one that did not pass on its way to the page, becomes a visible
    caution with the note."""
    import json

    path = cell_paths[0]

    def inconclusive(route):
        # the real answer for the uploaded file, fetched here (Playwright does not pass a multipart upload on)
        resp = httpx.post(live_server + "/v1/explain", files={"file": (path.name, path.read_bytes(), "image/tiff")},
                          data={"model": "main", "include_image": "true"}, timeout=60)
        body = resp.json()
        body["faithfulness"] = {**body["faithfulness"], "verdict": "inconclusive", "note": "on 50 held-out cells, "
                                "this method does not clearly beat a random map"}
        route.fulfill(status=resp.status_code, content_type="application/json", body=json.dumps(body))

    page.route("**/v1/explain*", inconclusive)
    page.set_input_files("#file-input", str(path))
    page.wait_for_function(ALL_SETTLED, timeout=60_000)
    caution = page.locator(".result").first.locator(".faithfulness")
    assert caution.is_visible()
    assert caution.inner_text() == ("Heatmap caution (inconclusive): on 50 held-out cells, this method does not "
                                    "clearly beat a random map.")


def test_bad_file_shows_error_and_page_keeps_working(page, cell_paths, tmp_path, console_errors):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    page.set_input_files("#file-input", [str(bad), str(cell_paths[-1])])
    cards = page.locator(".result")
    page.wait_for_function(ALL_SETTLED, timeout=60_000)
    by_name = {cards.nth(i).locator(".filename").inner_text(): cards.nth(i) for i in range(cards.count())}
    assert by_name["broken.png"].get_attribute("data-status") == "error"
    assert "422" in by_name["broken.png"].locator(".status").inner_text()
    assert by_name[cell_paths[-1].name].get_attribute("data-status") == "done"
    assert "1 failed" in page.inner_text("#summary")
    # Chromium logs the refused upload itself; that one is expected.
    console_errors[:] = [e for e in console_errors if "status of 422" not in e]


def test_field_shows_cell_boxes(page, live_server, field_path):
    page.uncheck("#explain-toggle")  # boxes only: no Grad-CAM, keeps the test quick
    page.set_input_files("#file-input", str(field_path))
    card = page.locator(".result").first
    page.wait_for_function(ALL_SETTLED, timeout=90_000)
    assert card.get_attribute("data-status") == "done", card.locator(".status").inner_text()
    assert card.get_attribute("data-mode") == "field"  # auto mode: a 1712 px image is a field
    n = int(card.get_attribute("data-cells"))
    # every cell gets a box; those cut by the field edge are drawn as partial and not counted
    assert n > 0 and card.locator(".cell-box:not(.partial)").count() == n
    assert card.locator(".cell-box.partial").count() >= 1  # this field has cells cut by its edge
    assert card.locator(".cell-box.abnormal").count() == int(card.get_attribute("data-abnormal"))
    assert "95% CI" in card.locator(".field-summary").inner_text()  # the abnormal share with its interval
    box = card.locator(".cell-box").first.bounding_box()
    stage = card.locator(".stage").bounding_box()
    assert box["width"] > 2 and stage["x"] <= box["x"] and box["x"] + box["width"] <= stage["x"] + stage["width"] + 1
    card.locator(".heatmap-toggle").check()
    assert card.get_attribute("data-view") == "overlay" and not card.locator(".boxes").is_visible()


def test_api_docs_page_renders_the_schema_offline(page, live_server):
    page.goto(live_server + "/docs")
    page.wait_for_selector("#api-paths .api-op")
    titles = page.locator("#api-paths h2").all_inner_texts()
    assert {"POST /v1/predict", "POST /v1/explain", "POST /v1/scan", "GET /v1/models", "GET /health"} <= set(titles)
    assert "include_image" in page.inner_text("#post-v1-predict")


def test_trust_caution_shows_exactly_when_the_api_flags(page, live_server, cell_paths, tmp_path):
    """A page of text is flagged as unlike the training images and a darkened real cell warns underexposed: each card
    shows the caution with the API's own reasons; a real cell the API neither flags nor warns about shows none."""
    import numpy as np
    from PIL import Image
    from skimage import data as skdata

    from leukoscope.data.images import read_image

    text = tmp_path / "text_page.png"
    Image.fromarray(np.stack([skdata.text()] * 3, -1)).save(text)
    dark = tmp_path / "dark_cell.png"
    Image.fromarray((read_image(cell_paths[0]).astype(np.float32) * 0.3).astype(np.uint8)).save(dark)
    files = [text, dark, cell_paths[-1]]
    api = {}
    for p in files:
        api[p.name] = httpx.post(live_server + "/v1/predict", files={"file": (p.name, p.read_bytes(), "image/png")},
                                 timeout=60).json()
    assert api["text_page.png"]["ood"] is True
    assert "underexposed" in {w["code"] for w in api["dark_cell.png"]["warnings"]}
    page.uncheck("#explain-toggle")
    page.set_input_files("#file-input", [str(p) for p in files])
    page.wait_for_function(ALL_SETTLED, timeout=90_000)
    cards = page.locator(".result")
    by_name = {cards.nth(i).locator(".filename").inner_text(): cards.nth(i) for i in range(cards.count())}
    for name, ans in api.items():
        card = by_name[name]
        assert card.get_attribute("data-status") == "done", card.locator(".status").inner_text()
        assert card.locator(".label").inner_text() == ans["label"]  # a flagged answer still gives its class
        assert card.get_attribute("data-ood") == str(ans["ood"]).lower()
        caution = card.locator(".trust")
        assert caution.is_visible() is (ans["ood"] or bool(ans["warnings"])), (name, ans["ood"], ans["warnings"])
        text_shown = caution.inner_text() if caution.is_visible() else ""
        assert ("unlike the images the model was trained on" in text_shown) is ans["ood"]
        for w in ans["warnings"]:
            assert w["message"] in text_shown
    assert by_name["text_page.png"].locator(".trust").is_visible()
    assert by_name["dark_cell.png"].locator(".trust").is_visible()
