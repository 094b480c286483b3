"""The README's picture of the search page: serve an index, search it in headless Chromium, save a screenshot.

    python experiments/search_page_screenshot.py IDX --query "red heart" --out docs/img/search-page.png

IDX: e.g. ``polyalign index runs/emoji4/concept/tuned/seed-0 --manifest data/emoji4/all.jsonl --id-field image
--out runs/emoji4-index``. Needs chromium + chromium-driver (``make browser-deps``).
"""
from __future__ import annotations

import argparse
import shutil
import socket
import threading
import time
import urllib.request


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("index")
    ap.add_argument("--query", default="red heart")
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--out", default="docs/img/search-page.png")
    ap.add_argument("--size", default="1280,900")
    args = ap.parse_args()

    import uvicorn
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import Select, WebDriverWait

    from polyalign.serve.http import create_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(args.index), host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    base = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            urllib.request.urlopen(base + "/healthz", timeout=1)
            break
        except OSError:
            time.sleep(0.1)
    opts = webdriver.ChromeOptions()
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", f"--window-size={args.size}"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)
    try:
        driver.get(base + "/")
        Select(driver.find_element(By.ID, "k")).select_by_value(str(args.k))
        driver.find_element(By.ID, "query").send_keys(args.query + "\n")
        WebDriverWait(driver, 30).until(ec.presence_of_element_located((By.CSS_SELECTOR, "#results .result img")))
        time.sleep(1.5)  # thumbnails load lazily
        driver.save_screenshot(args.out)
        print(f"wrote {args.out}")
    finally:
        driver.quit()
        server.should_exit = True


if __name__ == "__main__":
    main()
