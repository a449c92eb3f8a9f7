"""Screenshots of `camid ui` (a card with its heat map, and the batch view), and how long a batch takes in it.

Builds a tiny trained model (`camid.tiny.build_tiny_model`) in a temporary folder, starts the real `camid ui` on
a free port, and drives it with headless Chromium (Debian's package, through Playwright): uploads the model's
held-out zoo photos and a truncated JPEG, waits for the cards, screenshots the batch view, opens a card's heat map
and screenshots the card. With `--photos DIR` it then times a batch of the `--largest` N files of DIR from the
first upload to the last card shown, and the heat maps of the first photo, and prints the seconds.

    python bench/ui_screenshots.py --out docs                       # docs/ui-batch.png, docs/ui-card.png
    python bench/ui_screenshots.py --photos /path/to/jpegs --largest 20
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from camid.tiny import build_tiny_model  # noqa: E402

CHROMIUM = "/usr/bin/chromium"


def start_ui(tiny, tmp: Path) -> tuple[subprocess.Popen, str]:
    """`camid ui` on a free port for the tiny model; its output is drained so it never blocks."""
    env = {**tiny.env(), "PYTHONPATH": str(ROOT), "TMPDIR": str(tmp)}
    proc = subprocess.Popen([sys.executable, "-m", "camid", "ui", "--model", tiny.model_uri, "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp)
    lines, started = [], threading.Event()

    def read():
        for line in proc.stdout:
            lines.append(line)
            if "camid ui: http" in line:
                started.set()
        started.set()

    threading.Thread(target=read, daemon=True).start()
    found = started.wait(180) and re.search(r"camid ui: (http://\S+/)", "".join(lines))
    if not found:
        proc.kill()
        raise SystemExit("camid ui did not start:\n" + "".join(lines))
    return proc, found.group(1)


def shrink(path: Path) -> None:
    """The screenshot as a 256-colour PNG: a fraction of the bytes, the same to read."""
    from PIL import Image

    with Image.open(path) as image:
        small = image.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    small.save(path, optimize=True)


def answer(page, url: str, files: list, timeout_s: float = 600) -> float:
    """Upload `files` through the page and wait for the cards; the seconds it took."""
    page.goto(url)
    start = time.perf_counter()
    page.set_input_files("#files", files)
    page.wait_for_selector(".results details.card", timeout=timeout_s * 1000)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "camid-ui-screenshots",
                        help="folder for ui-batch.png and ui-card.png (the README's are in docs/)")
    parser.add_argument("--photos", type=Path, help="also time a batch of this folder's largest photos")
    parser.add_argument("--largest", type=int, default=20, help="how many of --photos (default 20)")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory(prefix="camid-bench-ui-") as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        tiny = build_tiny_model(tmp / "tiny")
        print(f"tiny model built in {time.perf_counter() - start:.0f} s")
        photos = [{"name": Path(p).name, "mimeType": "image/jpeg", "buffer": Path(p).read_bytes()}
                  for p in tiny.test.path[:8]]
        photos.append({"name": "truncated.jpg", "mimeType": "image/jpeg", "buffer": photos[0]["buffer"][:4000]})
        proc, url = start_ui(tiny, tmp)
        try:
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
                page = browser.new_page(viewport={"width": 1200, "height": 800}, device_scale_factor=1)
                seconds = answer(page, url, photos)
                print(f"{len(photos)} zoo photos answered in {seconds:.1f} s")
                args.out.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(args.out / "ui-batch.png"), type="png")
                page.click("table.batch-table tbody tr >> nth=2")
                card = page.locator("details.card[open]").first
                card.locator("button.show-heatmap").click()
                card.locator(".heatmap-figure img").wait_for(timeout=120_000)
                card.screenshot(path=str(args.out / "ui-card.png"), type="png")
                for name in ("ui-batch.png", "ui-card.png"):
                    shrink(args.out / name)
                    print(f"{args.out / name}: {(args.out / name).stat().st_size / 1024:.0f} KB")
                if args.photos:
                    files = sorted((p for p in args.photos.iterdir() if p.is_file()), key=lambda p: -p.stat().st_size)
                    files = [str(p) for p in files[:args.largest]]
                    size = sum(Path(f).stat().st_size for f in files) / 2 ** 20
                    seconds = answer(page, url, files)
                    print(f"{len(files)} largest photos of {args.photos} ({size:.1f} MB): cards in {seconds:.1f} s")
                    page.click("table.batch-table tbody tr >> nth=0")
                    start = time.perf_counter()
                    card = page.locator("details.card[open]").first
                    card.locator("button.show-heatmap").click()
                    card.locator(".heatmap-figure img").wait_for(timeout=120_000)
                    print(f"one heat map and Grad-CAM: {time.perf_counter() - start:.1f} s")
                browser.close()
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
