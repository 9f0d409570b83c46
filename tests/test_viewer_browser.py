"""The viewer in a real headless browser (Chromium via Selenium): open a study, scroll, click, read the result.

Slow (a browser start and a synthetic abdomen); skipped when Chromium, chromedriver or selenium are
absent. Set ``LIVERLESION_VIEWER_SCREENSHOT=docs/viewer.png`` to keep the page's screenshot (the
README's picture comes from this test, on a synthetic study).
"""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

from helpers import make_tiny_checkpoint, torch_threads
from liverlesion.io import write_volume
from liverlesion.volume import Volume

pytestmark = pytest.mark.slow


@pytest.fixture
def driver():
    """A headless Chromium (skips the test when there is none), quit afterwards."""
    drv = _driver()
    try:
        yield drv
    finally:
        drv.quit()


def _driver():
    webdriver = pytest.importorskip(
        "selenium.webdriver", reason="selenium is not installed (pip install selenium)"
    )
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    chromedriver = shutil.which("chromedriver")
    if chromium is None or chromedriver is None:
        pytest.skip("Chromium and chromedriver are not installed (apt-get install chromium chromium-driver)")
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    opts = Options()
    opts.binary_location = chromium
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1280,1100",
    ):
        opts.add_argument(arg)
    opts.add_argument("--force-device-scale-factor=1")
    # An explicit driver path: Selenium Manager never goes online.
    return webdriver.Chrome(service=Service(executable_path=chromedriver), options=opts)


@pytest.fixture(scope="module")
def study_files(tmp_path_factory):
    """A synthetic abdomen (never real data): label 2 is a cyst large enough to click."""
    from liverlesion.synth import simulate_patient

    tmp = tmp_path_factory.mktemp("browser")
    p = simulate_patient("demo", ["metastasis", "cyst"], seed=2, matrix=256)
    image = Volume(p.hu.astype(np.float32), p.spacing, p.origin, np.eye(3), {"modality": "CT"})
    write_volume(image, tmp / "demo_ct.nii.gz")
    write_volume(image.with_array(p.labels.astype(np.uint8)), tmp / "demo_lesions.nii.gz")
    return {"dir": tmp, "image": image, "labels": p.labels}


def test_open_scroll_click_and_read_the_result(driver, study_files, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.actions.wheel_input import ScrollOrigin
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    from liverlesion.predict import Classifier
    from liverlesion.serve import make_server

    ckpt = make_tiny_checkpoint(tmp_path / "model.pt", seed=3, size_px=32)
    with torch_threads(1):
        server = make_server([ckpt], host="127.0.0.1", port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}/"
    wait = WebDriverWait(driver, 120)
    d = study_files["dir"]
    labels = study_files["labels"]
    try:
        driver.get(url)
        assert "Research use, not for diagnosis" in driver.find_element(By.CLASS_NAME, "banner").text
        wait.until(lambda drv: "Model:" in drv.find_element(By.ID, "model-info").text)
        driver.find_element(By.ID, "image-file").send_keys(str(d / "demo_ct.nii.gz"))
        driver.find_element(By.ID, "mask-file").send_keys(str(d / "demo_lesions.nii.gz"))
        driver.find_element(By.ID, "open-button").click()
        wait.until(lambda drv: drv.find_element(By.ID, "view").is_displayed())
        zz, yy, xx = np.nonzero(labels == 2)
        counts = np.bincount(zz, minlength=labels.shape[0])
        k = int(np.argmax(counts))  # the cyst's largest cross-section: where the page opens
        slice_text = lambda drv: drv.find_element(By.ID, "slice-number").text  # noqa: E731
        wait.until(lambda drv: slice_text(drv).startswith(f"slice {k + 1} of "))

        # Scroll: arrow keys on the canvas and the mouse wheel, then back to the lesion.
        canvas = driver.find_element(By.ID, "slice-canvas")
        canvas.send_keys(Keys.ARROW_DOWN, Keys.ARROW_DOWN, Keys.ARROW_DOWN)
        wait.until(lambda drv: slice_text(drv).startswith(f"slice {k - 2} of "))
        ActionChains(driver).scroll_from_origin(ScrollOrigin.from_element(canvas), 0, -120).perform()
        wait.until(lambda drv: slice_text(drv).startswith(f"slice {k - 1} of "))
        canvas.send_keys(Keys.ARROW_UP, Keys.ARROW_UP)
        wait.until(lambda drv: slice_text(drv).startswith(f"slice {k + 1} of "))
        wait.until(lambda drv: drv.execute_script("return document.getElementById('slice-canvas').width") > 0)

        # Click the cyst's centre on the canvas (the page maps it back to the voxel).
        ny, nx = labels.shape[1:]
        y, x = float(yy[zz == k].mean()), float(xx[zz == k].mean())
        w, h = canvas.size["width"], canvas.size["height"]
        dx, dy = (x + 0.5) / nx * w - w / 2, (y + 0.5) / ny * h - h / 2
        ActionChains(driver).move_to_element_with_offset(canvas, round(dx), round(dy)).click().perform()
        wait.until(lambda drv: drv.find_elements(By.ID, "result-class"))
        latest = driver.find_element(By.ID, "latest-result").text
        assert latest.startswith("case-L02:"), latest  # the mask's label is the lesion id
        shown = driver.find_element(By.ID, "result-class").text
        row = driver.find_element(By.CSS_SELECTOR, "#results-table tbody tr[data-lesion='case-L02']")
        cells = [c.text for c in row.find_elements(By.TAG_NAME, "td")]

        with torch_threads(1):
            clf = Classifier.load([ckpt])
            exp = clf.predict(
                study_files["image"], mask=study_files["image"].with_array(labels.astype(np.uint8)), label=2
            ).iloc[0]
        assert shown == exp["pred_class"] and cells[1] == exp["pred_class"]
        assert cells[2] == f"{exp['prob_cyst']:.3f}" and cells[3] == f"{exp['prob_metastasis']:.3f}"

        # Drag off the mask to set a diameter: a click lesion with that diameter.
        free_y, free_x = int(round(y)), int(round(x)) + 25
        assert labels[k, free_y, free_x] == 0
        fx, fy = (free_x + 0.5) / nx * w - w / 2, (free_y + 0.5) / ny * h - h / 2
        ActionChains(driver).move_to_element_with_offset(
            canvas, round(fx), round(fy)
        ).click_and_hold().move_by_offset(8, 0).release().perform()
        wait.until(lambda drv: drv.find_elements(By.CSS_SELECTOR, "tr[data-lesion='case-C01']"))
        diameter = float(driver.find_element(By.ID, "diameter").get_attribute("value"))
        assert 2 < diameter < 40  # set by the drag (8 screen px), not the default 15
        # The overlay with its Grad-CAM arrives; the busy indicator goes away.
        wait.until(
            lambda drv: drv.execute_script(
                "const i = document.getElementById('overlay'); return i.complete && i.naturalWidth > 0"
            )
        )
        wait.until(lambda drv: not drv.find_element(By.ID, "busy").is_displayed())
        assert not driver.find_element(By.ID, "error").is_displayed()
        # A row of the table selects its lesion and shows its slice.
        driver.find_element(By.CSS_SELECTOR, "#results-table tbody tr[data-lesion='case-L02']").click()
        wait.until(lambda drv: drv.find_element(By.ID, "latest-result").text.startswith("case-L02:"))
        wait.until(lambda drv: slice_text(drv).startswith(f"slice {exp['centre_slice'] + 1} of "))
        wait.until(
            lambda drv: drv.execute_script(
                "const i = document.getElementById('overlay');"
                "return i.complete && i.naturalWidth > 0 && i.src.includes('case-L02')"
            )
        )
        wait.until(lambda drv: not drv.find_element(By.ID, "busy").is_displayed())
        # Everything fits the page width (the old results table ran off it).
        assert driver.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")
        shot = tmp_path / "viewer.png"
        driver.save_screenshot(str(shot))
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        keep = os.environ.get("LIVERLESION_VIEWER_SCREENSHOT")
        if keep:
            Path(keep).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(shot, keep)
        # (after the screenshot) A NIfTI study: the DICOM SEG link stays disabled, its tooltip says
        # why, and a click on it says so too.
        seg_link = driver.find_element(By.ID, "dl-seg")
        why = seg_link.get_attribute("title")
        assert seg_link.get_attribute("aria-disabled") == "true"
        assert "opened as" in why and "DICOM series" in why
        assert driver.find_element(By.ID, "dl-csv").get_attribute("aria-disabled") == "false"
        seg_link.click()
        wait.until(lambda drv: drv.find_element(By.ID, "error").is_displayed())
        assert driver.find_element(By.ID, "error").text == why
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


# --------------------------------------------------------------------------- the page's own behaviour
# One server on the small two-lesion CT (tests/helpers) and one browser for the tests below; each test
# loads the page afresh.


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    from helpers import make_ct_with_two_lesions
    from liverlesion.serve import make_server

    tmp = tmp_path_factory.mktemp("page")
    image, mask = make_ct_with_two_lesions()  # 24 x 48 x 48: a 12 mm and a too small lesion
    write_volume(image, tmp / "ct.nii.gz")
    write_volume(mask, tmp / "mask.nii.gz")
    ckpt = make_tiny_checkpoint(tmp / "model.pt", seed=3, size_px=32)
    with torch_threads(1):
        server = make_server([ckpt], host="127.0.0.1", port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        drv = _driver()
        try:
            yield {
                "driver": drv,
                "server": server,
                "url": f"http://127.0.0.1:{server.server_address[1]}/",
                "dir": tmp,
                "ckpt": ckpt,
            }
        finally:
            drv.quit()
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def _open(page, url: str | None = None, mask: bool = True):
    """Load the page, open the small CT (and its mask), wait for the first slice; returns a waiter."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    drv, wait = page["driver"], WebDriverWait(page["driver"], 60)
    drv.get(url or page["url"])
    wait.until(lambda d: "Model:" in d.find_element(By.ID, "model-info").text)
    drv.find_element(By.ID, "image-file").send_keys(str(page["dir"] / "ct.nii.gz"))
    if mask:
        drv.find_element(By.ID, "mask-file").send_keys(str(page["dir"] / "mask.nii.gz"))
    drv.find_element(By.ID, "open-button").click()
    wait.until(lambda d: d.find_element(By.ID, "view").is_displayed())
    wait.until(lambda d: d.execute_script("return document.getElementById('slice-canvas').width") > 0)
    return wait


def _error(drv) -> str:
    from selenium.webdriver.common.by import By

    e = drv.find_element(By.ID, "error")
    return e.text if e.is_displayed() else ""


def test_window_level_in_hu_and_a_fixed_value_clears_its_error(page):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    drv = page["driver"]
    wait = _open(page)
    toolbar = drv.find_element(By.ID, "level").find_element(By.XPATH, "../..").text
    assert toolbar.count("HU") >= 2, toolbar  # the units of L and W are on the page
    Select(drv.find_element(By.ID, "preset")).select_by_value("custom")
    width = drv.find_element(By.ID, "width")
    width.clear()
    width.send_keys("0", Keys.TAB)
    wait.until(lambda d: _error(d).startswith("window:"))
    width.clear()
    width.send_keys("400", Keys.TAB)
    wait.until(lambda d: _error(d) == "")  # stayed up after the value was fixed
    wait.until(
        lambda d: d.execute_script(
            "return performance.getEntriesByType('resource').some((e) => e.name.includes('ww=400'))"
        )
    )


def test_slice_keys_work_after_a_button_or_row_click_with_home_and_end(page):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    drv = page["driver"]
    wait = _open(page)
    slice_text = lambda d: d.find_element(By.ID, "slice-number").text  # noqa: E731
    drv.find_element(By.ID, "goto-lesion").click()  # the focus is on the button, not the canvas
    wait.until(lambda d: " of 24, z = " in slice_text(d))
    k = int(slice_text(drv).split(" of")[0].split()[-1])
    ActionChains(drv).send_keys(Keys.ARROW_DOWN).perform()
    wait.until(lambda d: slice_text(d).startswith(f"slice {k - 1} of "))
    ActionChains(drv).send_keys(Keys.END).perform()
    wait.until(lambda d: slice_text(d).startswith("slice 24 of "))
    ActionChains(drv).send_keys(Keys.HOME).perform()
    wait.until(lambda d: slice_text(d).startswith("slice 1 of "))
    # A field keeps its arrow keys: the diameter is stepped, the slice stays.
    drv.find_element(By.ID, "diameter").send_keys(Keys.ARROW_UP)
    assert drv.find_element(By.ID, "diameter").get_attribute("value") == "15.5"
    assert slice_text(drv).startswith("slice 1 of ")


def test_a_stopped_server_is_said_in_words_not_failed_to_fetch(page):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    from liverlesion.serve import make_server

    with torch_threads(1):
        server = make_server([page["ckpt"]], host="127.0.0.1", port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    drv = page["driver"]
    try:
        wait = _open(page, url=f"http://127.0.0.1:{server.server_address[1]}/")
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
    said = "the liverlesion server does not answer"
    ActionChains(drv).send_keys(Keys.ARROW_UP).perform()  # a slice it cannot fetch
    wait.until(lambda d: said in _error(d))
    drv.execute_script("document.getElementById('error').hidden = true")
    canvas = drv.find_element(By.ID, "slice-canvas")
    ActionChains(drv).move_to_element(canvas).click().perform()  # a click it cannot classify
    wait.until(lambda d: said in _error(d))
    assert "Failed to fetch" not in _error(drv)
    wait.until(lambda d: not d.find_element(By.ID, "busy").is_displayed())  # no spinner left turning
    drv.execute_script("document.getElementById('error').hidden = true")
    drv.find_element(By.ID, "open-button").click()  # an upload nobody takes
    wait.until(lambda d: said in _error(d))
    assert drv.find_element(By.ID, "open-button").is_enabled()


def test_downloads_are_saved_and_a_closed_study_says_so(page, tmp_path):
    import json
    import urllib.request

    from selenium.webdriver.common.by import By

    drv = page["driver"]
    wait = _open(page)
    drv.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(tmp_path)})
    drv.find_element(By.ID, "classify-all").click()
    wait.until(lambda d: d.find_element(By.ID, "dl-json").get_attribute("aria-disabled") == "false")
    drv.find_element(By.ID, "dl-json").click()
    wait.until(lambda d: (tmp_path / "results.json").is_file())
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["disclaimer"] == "research use, not for diagnosis"
    assert _error(drv) == ""
    # The study is closed (as after idling past --study-ttl-min): the link says so instead of a silent
    # failed download.
    href = drv.find_element(By.ID, "dl-csv").get_attribute("href")
    study = href.rsplit("/", 1)[0]
    urllib.request.urlopen(urllib.request.Request(study, method="DELETE"), timeout=30).close()
    drv.find_element(By.ID, "dl-csv").click()
    wait.until(lambda d: _error(d).startswith("results.csv: study "))
    assert "open the CT again" in _error(drv)
    assert not (tmp_path / "results.csv").exists()


def test_controls_are_off_while_a_classification_runs(page, monkeypatch):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    from liverlesion.serve import viewer

    gate, classify = threading.Event(), viewer.classify

    def held(*args, **kwargs):  # the job stays "running" until the test lets it go
        gate.wait(60)
        return classify(*args, **kwargs)

    monkeypatch.setattr(viewer, "classify", held)
    drv = page["driver"]
    wait = _open(page)
    ids = ("classify-all", "classify-label", "open-button")
    try:
        drv.find_element(By.ID, "classify-all").click()
        wait.until(lambda d: d.find_element(By.ID, "busy").is_displayed())
        assert [drv.find_element(By.ID, i).is_enabled() for i in ids] == [False] * 3
        canvas = drv.find_element(By.ID, "slice-canvas")
        ActionChains(drv).move_to_element(canvas).click().perform()  # says why nothing starts
        wait.until(lambda d: _error(d).startswith("still classifying"))
        jobs = page["server"].jobs._jobs.values()
        assert sum(j.state in ("queued", "running") for j in jobs) == 1  # the click queued nothing more
    finally:
        gate.set()
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#results-table tbody tr"))
    wait.until(lambda d: all(d.find_element(By.ID, i).is_enabled() for i in ids))


def test_result_says_the_rule_the_minimum_size_and_no_spread_for_one_model(page):
    from selenium.webdriver.common.by import By

    drv = page["driver"]
    wait = _open(page)
    latest = lambda d: d.find_element(By.ID, "latest-result").text  # noqa: E731
    rule = drv.find_element(By.ID, "decision-rule").text  # next to the result, not only in the footer
    assert "metastasis if P(metastasis) >= 0.5" in rule and "not a diagnosis" in rule
    drv.find_element(By.ID, "classify-all").click()
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results-table tbody tr")) == 2)
    wait.until(lambda d: not d.find_element(By.ID, "busy").is_displayed())
    rows = drv.find_elements(By.CSS_SELECTOR, "#results-table tbody tr")  # redrawn on each selection: ids
    small = next(r for r in rows if "too small" in r.text).get_attribute("data-lesion")
    big = next(r for r in rows if "too small" not in r.text).get_attribute("data-lesion")
    drv.find_element(By.CSS_SELECTOR, f"tr[data-lesion='{small}']").click()
    wait.until(lambda d: "too small" in latest(d))
    assert "under the 5 mm minimum: not classified" in latest(drv)
    assert "Grad-CAM" not in drv.find_element(By.ID, "overlay-caption").text  # none is drawn for it
    drv.find_element(By.CSS_SELECTOR, f"tr[data-lesion='{big}']").click()
    wait.until(lambda d: "P(metastasis)" in latest(d))
    assert "one model (no ensemble spread)" in latest(drv) and "uncertainty 0.00" not in latest(drv)
    assert "of at most 1.00 bits" in latest(drv)
    heads = [h.text for h in drv.find_elements(By.CSS_SELECTOR, "#results-table thead th")]
    assert "ensemble SD" in heads and "uncertainty" not in heads


def _move_to_voxel(drv, x: int, y: int) -> None:
    """Move the mouse over pixel (x, y) of the slice canvas (the small CT: 48 x 48 pixels)."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    canvas = drv.find_element(By.ID, "slice-canvas")
    w, h = canvas.size["width"], canvas.size["height"]
    dx, dy = (x + 0.5) / 48 * w - w / 2, (y + 0.5) / 48 * h - h / 2
    ActionChains(drv).move_to_element_with_offset(canvas, round(dx), round(dy)).perform()


def test_hu_under_the_mouse_follows_it_and_the_slice(page):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    from helpers import make_ct_with_two_lesions

    image, _ = make_ct_with_two_lesions()
    drv = page["driver"]
    wait = _open(page, mask=False)
    readout = lambda d: d.find_element(By.ID, "hu-readout").text  # noqa: E731
    k = int(drv.execute_script("return Number(document.getElementById('slice-range').value)"))

    def expect(k, y, x):  # the slice numbered from 1, as the slice counter; pixels from 0, as x_px / y_px
        hu = round(float(image.array[k, y, x])) or 0
        lx, ly, lz = image.index_to_physical((k, y, x))
        return f"x {x}, y {y}, slice {k + 1}: {hu} HU · LPS ({lx:.1f}, {ly:.1f}, {lz:.1f}) mm"

    _move_to_voxel(drv, 23, 23)
    wait.until(lambda d: readout(d) == expect(k, 23, 23))
    _move_to_voxel(drv, 2, 3)  # air
    wait.until(lambda d: readout(d) == expect(k, 3, 2))
    assert int(readout(drv).split(": ")[1].split(" HU")[0]) < -500
    ActionChains(drv).send_keys(Keys.ARROW_UP).perform()  # the mouse stays: the new slice's value
    wait.until(lambda d: readout(d) == expect(k + 1, 3, 2))
    for x in range(4, 45, 3):  # a quick sweep: the readout ends on the last position, not an older answer
        _move_to_voxel(drv, x, 20)
    wait.until(lambda d: readout(d) == expect(k + 1, 20, 43))
    ActionChains(drv).move_to_element(drv.find_element(By.ID, "diameter")).perform()  # off the slice
    wait.until(lambda d: "HU" in readout(d) and "x " not in readout(d))


def test_slice_counter_numbers_from_one_with_z_as_the_table_and_says_the_csv_numbering(page):
    import io
    import urllib.request

    import pandas as pd
    from scipy import ndimage
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    from helpers import make_ct_with_two_lesions

    image, mask = make_ct_with_two_lesions()
    drv = page["driver"]
    wait = _open(page)
    counter = lambda d: d.find_element(By.ID, "slice-number").text  # noqa: E731

    def named(k):  # a PACS's numbering (from 1) and the slice's LPS z
        return f"slice {k + 1} of 24, z = {image.index_to_physical((k, 0, 0))[2]:.1f} mm"

    drv.find_element(By.ID, "slice-canvas").send_keys(Keys.HOME)
    wait.until(lambda d: counter(d) == named(0))
    drv.find_element(By.ID, "slice-canvas").send_keys(Keys.ARROW_UP)
    wait.until(lambda d: counter(d) == named(1))
    assert counter(drv) == "slice 2 of 24, z = 102.5 mm"  # origin z 100 mm, 2.5 mm slices
    options = [o.text for o in drv.find_elements(By.CSS_SELECTOR, "#mask-lesion option")]
    comps, n = ndimage.label(mask.array > 0, structure=np.ones((3, 3, 3), dtype=bool))
    for lab, o in zip(range(1, n + 1), options, strict=True):  # the mask lesions' slices, from 1 too
        zs = np.flatnonzero((comps == lab).any(axis=(1, 2)))
        assert f"slices {zs[0] + 1}–{zs[-1] + 1}" in o, o
    drv.find_element(By.ID, "classify-all").click()
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results-table tbody tr")) == 2)
    wait.until(lambda d: not d.find_element(By.ID, "busy").is_displayed())
    # The table's slice is the counter's: results.csv's centre_slice (from 0, unchanged) + 1.
    csv_url = drv.find_element(By.ID, "dl-csv").get_attribute("href")
    with urllib.request.urlopen(csv_url, timeout=30) as r:
        rows = pd.read_csv(io.BytesIO(r.read())).set_index("lesion_id")
    heads = [h.text for h in drv.find_elements(By.CSS_SELECTOR, "#results-table thead th")]
    col = heads.index("slice")
    tr = drv.find_element(By.CSS_SELECTOR, "#results-table tbody tr[data-lesion='case-L01']")
    centre = int(rows.loc["case-L01", "centre_slice"])
    assert tr.find_elements(By.TAG_NAME, "td")[col].text == str(centre + 1)
    tr.click()
    wait.until(lambda d: counter(d) == named(centre))
    assert named(centre) in drv.find_element(By.ID, "overlay-caption").text
    note = drv.find_element(By.ID, "slice-numbering").text
    assert "numbered from 1" in note and "centre_slice" in note and "counts from 0" in note


def _red_pixels(drv) -> int:
    """Pixels of the click marker's red (#ff3030) on the slice canvas (the CT itself is grey)."""
    return drv.execute_script(
        "const c = document.getElementById('slice-canvas');"
        "const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data; let n = 0;"
        "for (let i = 0; i < d.length; i += 4) if (d[i] > 150 && d[i + 1] < 110 && d[i + 2] < 110) n++;"
        "return n;"
    )


def test_a_refused_click_leaves_no_marker_on_the_slice(page):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    drv = page["driver"]
    wait = _open(page, mask=False)
    for x, y, diameter, said in ((1, 1, "15", "air (HU"), (23, 23, "-4", "positive")):
        d = drv.find_element(By.ID, "diameter")
        d.clear()
        d.send_keys(diameter)
        drv.execute_script("document.getElementById('error').hidden = true")
        _move_to_voxel(drv, x, y)
        ActionChains(drv).click().perform()
        wait.until(lambda d, said=said: said in _error(d))
        wait.until(lambda d: not d.find_element(By.ID, "busy").is_displayed())
        assert _red_pixels(drv) == 0, said  # the marker went with the refusal
    # a click that is classified keeps its marker (and the check above can see one)
    d = drv.find_element(By.ID, "diameter")
    d.clear()
    d.send_keys("12")
    _move_to_voxel(drv, 23, 23)
    ActionChains(drv).click().perform()
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "tr[data-lesion='case-C01']"))
    assert _red_pixels(drv) > 0


def test_a_too_big_upload_is_refused_in_the_page_in_the_servers_words(page):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from liverlesion.serve import make_server
    from liverlesion.serve.server import too_large_message

    limit = 10_000  # the small CT and its mask are larger
    with torch_threads(1):
        server = make_server([page["ckpt"]], host="127.0.0.1", port=0, max_upload_bytes=limit)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    drv = page["driver"]
    try:
        wait = WebDriverWait(drv, 60)
        drv.get(f"http://127.0.0.1:{server.server_address[1]}/")
        wait.until(lambda d: "Model:" in d.find_element(By.ID, "model-info").text)
        ct, mask = page["dir"] / "ct.nii.gz", page["dir"] / "mask.nii.gz"
        drv.find_element(By.ID, "image-file").send_keys(str(ct))
        drv.find_element(By.ID, "mask-file").send_keys(str(mask))
        drv.find_element(By.ID, "open-button").click()
        size = ct.stat().st_size + mask.stat().st_size
        wait.until(lambda d: _error(d) != "")
        assert _error(drv) == too_large_message(size, limit)
        sent = drv.execute_script(
            "return performance.getEntriesByType('resource').filter((e) => e.name.endsWith('/api/studies')).length"
        )
        assert sent == 0  # nothing was uploaded
        assert drv.find_element(By.ID, "open-button").is_enabled()
        assert not drv.find_element(By.ID, "open-progress").is_displayed()
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
