"""The search page in a real browser: a tiny trained run, its index and the HTTP service on a local port, driven by
headless Chromium. A text search (Enter) fills the grid with what GET /search answers (ids, scores to 3 decimals,
captions, thumbnails that load), the URL keeps the query and reloads to the same search, the captions target shows
caption cards, "more like this" runs the like=ID search (the item first), an uploaded and a dropped image run the
POST search, and errors (an empty query, an unknown id) show the service's message. A screenshot is saved to
tmp_path and to $POLYALIGN_SCREENSHOT when set.

Needs Chromium and its driver: `make browser-deps`, or `apt-get install -y chromium chromium-driver`."""
from __future__ import annotations

import os
import re
import shutil
import socket
import threading
import time
import urllib.parse
from pathlib import Path

import pytest

from conftest import TINY

INSTALL = "install them with `make browser-deps` (or `apt-get install -y chromium chromium-driver`)"
CHROMEDRIVER = shutil.which("chromedriver")
CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
if not (CHROMEDRIVER and CHROMIUM):
    missing = " and ".join(n for n, p in (("chromium", CHROMIUM), ("chromedriver", CHROMEDRIVER)) if not p)
    pytest.skip(f"the browser test needs {missing} on PATH; {INSTALL}", allow_module_level=True)

httpx = pytest.importorskip("httpx", reason="the browser test needs httpx (pip install httpx)")
uvicorn = pytest.importorskip("uvicorn", reason="the browser test needs uvicorn (pip install uvicorn fastapi)")
webdriver = pytest.importorskip("selenium.webdriver", reason="the browser test needs selenium (pip install selenium)")
from selenium.common.exceptions import TimeoutException  # noqa: E402
from selenium.webdriver.chrome.options import Options  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

QUERY = "red circle"
WAIT = 30  # seconds: a search on the tiny model answers in milliseconds, a first page load takes longer


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The real service on a tiny trained run's test-split index, at http://127.0.0.1:<free port>."""
    from polyalign.app.training import train
    from polyalign.config import load_config
    from polyalign.serve.http import create_app
    from polyalign.serve.index import build_index

    root = tmp_path_factory.mktemp("browser")
    run, idx = root / "run", root / "index"
    train(load_config(None, TINY + ["train.threads=1", "eval.n_examples=0"]), run, show_progress=False)
    build_index(run, idx, split="test")
    app = create_app(idx, run_dir=run, device="cpu")
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, name="polyalign-http", daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while True:
        try:
            if httpx.get(base + "/healthz", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert thread.is_alive(), "the HTTP service stopped while starting"
        assert time.time() < deadline, "the HTTP service did not answer /healthz within 60 s"
        time.sleep(0.1)
    yield base
    srv.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def api(server):
    with httpx.Client(base_url=server, timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def driver():
    opts = Options()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,900", "--disable-extensions", "--no-first-run"):
        opts.add_argument(arg)
    drv = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    drv.set_page_load_timeout(WAIT)
    yield drv
    drv.quit()


# ---- helpers -------------------------------------------------------------------------------------------------------
def _seq(drv) -> int:
    return int(drv.find_element(By.ID, "results").get_attribute("data-seq") or 0)


def _settled(drv, after: int) -> str:
    """Wait until a search newer than ``after`` has been answered; its state: done or error."""
    def ready(d):
        el = d.find_element(By.ID, "results")
        state = el.get_attribute("data-state")
        return state if int(el.get_attribute("data-seq") or 0) > after and state in ("done", "error") else False
    try:
        return WebDriverWait(drv, WAIT).until(ready)
    except TimeoutException:
        errors = [e for e in drv.get_log("browser") if e.get("level") == "SEVERE"]
        raise AssertionError(f"the page did not finish a search within {WAIT} s; console errors: {errors}") from None


def _cards(drv) -> list[dict]:
    """What each result card shows."""
    return drv.execute_script("""
        return [...document.querySelectorAll('#results .result')].map(c => ({
          id: c.dataset.id, img: c.querySelector('img') ? c.querySelector('img').getAttribute('src') : null,
          rank: c.querySelector('.rank').textContent.trim(),
          score: c.querySelector('.score').textContent.trim(),
          caption: c.querySelector('.caption').textContent.trim(),
          text: c.classList.contains('text'),
        }));""")


def _expected(body: dict) -> list[dict]:
    return [{"id": r["id"], "rank": f"#{r['rank']}", "score": f"{r['score']:.3f}", "caption": r["caption"].strip()}
            for r in body["results"]]


def _shown(cards: list[dict]) -> list[dict]:
    return [{k: c[k] for k in ("id", "rank", "score", "caption")} for c in cards]


def _status(drv) -> str:
    return drv.find_element(By.ID, "status").text.strip()


def _error(drv) -> str:
    el = drv.find_element(By.ID, "error")
    return el.text.strip() if el.is_displayed() else ""


def _query_param(drv, name: str) -> str | None:
    values = urllib.parse.parse_qs(urllib.parse.urlsplit(drv.current_url).query).get(name)
    return values[0] if values else None


def _open(drv, url: str) -> None:
    drv.get(url)
    WebDriverWait(drv, WAIT).until(lambda d: d.execute_script("return document.readyState") == "complete")


def _text_search(drv, server, text: str) -> None:
    _open(drv, server + "/")
    box = drv.find_element(By.ID, "query")
    before = _seq(drv)
    box.clear()
    box.send_keys(text, Keys.ENTER)  # Enter searches, as the button does
    assert _settled(drv, before) == "done", _error(drv)


def _save_screenshot(drv, tmp_path: Path, name: str) -> Path:
    shot = tmp_path / name
    assert drv.save_screenshot(str(shot)) and shot.stat().st_size > 1000, "no screenshot was written"
    if os.environ.get("POLYALIGN_SCREENSHOT"):
        dest = Path(os.environ["POLYALIGN_SCREENSHOT"])
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, dest)
    return shot


# ---- tests ---------------------------------------------------------------------------------------------------------
def test_page_and_its_files_are_served_by_the_app(server, api):
    page = api.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    for ref in re.findall(r'(?:src|href)="(/static/[^"]+)"', page.text):
        assert api.get(ref).status_code == 200, f"{ref} named by the page is not served"
    assert not re.search(r'(?:src|href)="(?:https?:)?//', page.text), "the page must not load anything external"


def test_a_text_search_shows_what_the_service_answers(server, api, driver, tmp_path):
    _text_search(driver, server, QUERY)
    body = api.get("/search", params={"text": QUERY, "k": 10, "target": "image"}).json()
    cards = _cards(driver)
    assert len(body["results"]) == 10 and len(cards) == 10
    assert _shown(cards) == _expected(body)  # ids, ranks, scores (3 decimals) and captions, in order
    first = cards[0]
    assert re.fullmatch(r"-?\d\.\d{3}", first["score"]) and first["caption"], first
    assert first["img"] == body["results"][0]["image_url"]
    assert re.fullmatch(r"10 results in [\d.]+ ms", _status(driver)), _status(driver)
    assert _error(driver) == ""
    WebDriverWait(driver, WAIT).until(lambda d: d.execute_script(  # the thumbnails load from /items/<id>/image
        "const i = document.querySelector('#results .result img'); return i && i.complete && i.naturalWidth > 0"),
        "the first thumbnail did not load")
    assert _query_param(driver, "q") == QUERY  # the URL keeps the search
    _save_screenshot(driver, tmp_path, "search.png")


def test_a_shared_url_reloads_its_search_and_the_captions_target_shows_captions(server, api, driver):
    _open(driver, server + "/?" + urllib.parse.urlencode({"q": QUERY, "k": 5}))
    _settled(driver, 0)
    assert driver.find_element(By.ID, "query").get_attribute("value") == QUERY
    want = api.get("/search", params={"text": QUERY, "k": 5}).json()
    assert _shown(_cards(driver)) == _expected(want)

    before = _seq(driver)
    Select(driver.find_element(By.ID, "target")).select_by_value("text")  # changing the target reruns the search
    assert _settled(driver, before) == "done", _error(driver)
    want = api.get("/search", params={"text": QUERY, "k": 5, "target": "text"}).json()
    cards = _cards(driver)
    assert want["target"] == "text" and _shown(cards) == _expected(want)
    assert all(c["text"] for c in cards), "caption results are shown as caption cards"
    assert _query_param(driver, "target") == "text" and _query_param(driver, "q") == QUERY

    before = _seq(driver)
    Select(driver.find_element(By.ID, "k")).select_by_value("20")  # so does changing k
    assert _settled(driver, before) == "done", _error(driver)
    want = api.get("/search", params={"text": QUERY, "k": 20, "target": "text"}).json()
    assert len(want["results"]) == 20 and _shown(_cards(driver)) == _expected(want)
    assert re.fullmatch(r"20 results in [\d.]+ ms", _status(driver)), _status(driver)
    assert _query_param(driver, "k") == "20"


def test_more_like_this_searches_by_the_items_embedding(server, api, driver):
    _text_search(driver, server, QUERY)
    before_ids = [c["id"] for c in _cards(driver)]
    card = driver.find_elements(By.CSS_SELECTOR, "#results .result")[3]
    item = card.get_attribute("data-id")
    before = _seq(driver)
    card.find_element(By.CSS_SELECTOR, ".more").click()
    assert _settled(driver, before) == "done", _error(driver)
    cards = _cards(driver)
    want = api.get("/search", params={"like": item, "k": 10}).json()
    assert cards[0]["id"] == item, "an item is the most like itself"
    assert _shown(cards) == _expected(want) and [c["id"] for c in cards] != before_ids
    assert _query_param(driver, "like") == item and _query_param(driver, "q") is None


def test_an_uploaded_and_a_dropped_image_search_by_image(server, api, driver, tmp_path):
    _open(driver, server + "/")
    first = api.get("/search", params={"text": QUERY, "k": 1}).json()["results"][0]
    png = tmp_path / "query.png"
    png.write_bytes(api.get(first["image_url"]).content)
    want = api.post("/search", files={"file": ("query.png", png.read_bytes(), "image/png")}, data={"k": "10"}).json()
    assert want["query"] == {"image": "query.png"}

    before = _seq(driver)
    driver.find_element(By.ID, "file").send_keys(str(png))  # the hidden input behind the drop zone
    assert _settled(driver, before) == "done", _error(driver)
    assert _shown(_cards(driver)) == _expected(want)
    assert re.fullmatch(r"10 results in [\d.]+ ms", _status(driver)), _status(driver)

    _open(driver, server + "/")  # a file dropped on the zone: the same search
    before = _seq(driver)
    driver.execute_script("""
        const url = arguments[0];
        fetch(url).then(r => r.blob()).then(blob => {
          const dt = new DataTransfer();
          dt.items.add(new File([blob], 'query.png', {type: 'image/png'}));
          document.querySelector('#drop').dispatchEvent(new DragEvent('drop', {dataTransfer: dt, bubbles: true}));
        });""", first["image_url"])
    assert _settled(driver, before) == "done", _error(driver)
    assert _shown(_cards(driver)) == _expected(want)


def test_errors_show_the_services_message(server, api, driver, tmp_path):
    _text_search(driver, server, QUERY)
    assert _cards(driver)
    empty = api.get("/search", params={"text": ""})
    assert empty.status_code == 400 and empty.json()["error"]
    box = driver.find_element(By.ID, "query")
    box.clear()
    before = _seq(driver)
    driver.find_element(By.ID, "search").click()
    assert _settled(driver, before) == "error"
    assert _error(driver) == empty.json()["error"].strip()
    assert _cards(driver) == [] and _status(driver) == ""

    missing = api.get("/search", params={"like": "no-such-item"})
    assert missing.status_code == 404 and missing.json()["error"]
    _open(driver, server + "/?like=no-such-item")
    assert _settled(driver, 0) == "error"
    assert _error(driver) == missing.json()["error"].strip()

    bad = tmp_path / "notes.png"  # not an image, whatever its name says
    bad.write_text("these are not pixels\n")
    refused = api.post("/search", files={"file": ("notes.png", bad.read_bytes(), "image/png")})
    assert refused.status_code in (400, 415) and refused.json()["error"]
    before = _seq(driver)
    driver.find_element(By.ID, "file").send_keys(str(bad))
    assert _settled(driver, before) == "error"
    assert _error(driver) == refused.json()["error"].strip()

    _text_search(driver, server, QUERY)  # the next good search clears the error
    assert _error(driver) == "" and len(_cards(driver)) == 10
