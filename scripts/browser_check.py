#!/usr/bin/env python3
"""Open every page of the built book in headless Chromium at 1280 px and fail pages that are not
self-contained or not readable.

    python scripts/browser_check.py [--html _build/src/_build/html] [--screenshots _build/screenshots]

The site is served on 127.0.0.1 by Python's http.server. A page fails when: a request goes to any
other host (intercepted and aborted), a JavaScript error is raised or logged (except the benign
"Identifier 'THEBE_JS_URL' has already been declared" of every Jupyter Book 1 page), a local
request fails or returns >= 400 (except /favicon.ico), an <img> has not loaded, an Altair chart
container (div#altair-viz-*) has no rendered svg/canvas, and, for what a reader reads:

* rendered text **overflows its column** (an element sticks out of the article, or a box of
  text or a table scrolls sideways); folded code is not counted;
* a table, or the introduction's "Results at a glance" box, shows a **raw key**: a ``snake_case``
  word outside ``code``, or a result's headline key (two underscores or more) with its underscores
  turned to spaces (``--results``: where those keys are read);
* a chart has an **axis without a title** (an axis with labels but no title, in the SVG vega draws).

Full-page screenshots of the introduction, the benchmarks page and every chapter go to
``--screenshots``. Prints one line per page and finally 'N passed, N failed'; exit status 1 if any
page failed. Uses the system chromium; never downloads a browser.
"""

from __future__ import annotations

import argparse
import faulthandler
import functools
import http.server
import json
import re
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
BENIGN_JS = ("Identifier 'THEBE_JS_URL' has already been declared",)
LOCAL_HOSTS = {"127.0.0.1"}

CHARTS_JS = """() => Array.from(document.querySelectorAll('div[id^="altair-viz-"]')).map(d => ({
  id: d.id, ok: !!d.querySelector('svg, canvas') && !d.querySelector('.error')}))"""
IMAGES_JS = """() => Array.from(document.images).filter(i => !i.complete || i.naturalWidth === 0)
  .map(i => i.getAttribute('src'))"""
WIDTH, HEIGHT = 1280, 900
# Overflow is also checked this many pixels narrower: other fonts and other CPU numbers in CI made a table
# that fit here by 2 px stick out there by 8, so a page must fit with this much to spare.
HEADROOM_PX = 48
COLUMN = "article.bd-article"
KEY_LIKE = r"\b[a-z0-9]+(?:_[a-z0-9]+)+\b"

# Elements of the article column whose box must stay inside it, and boxes that must not scroll sideways.
OVERFLOW_JS = """(column) => {
  const col = document.querySelector(column);
  if (!col) return [];
  const box = col.getBoundingClientRect(), pad = getComputedStyle(col), out = [];
  const c = {left: box.left + parseFloat(pad.paddingLeft), right: box.right - parseFloat(pad.paddingRight)};  // the text column
  const name = el => el.tagName.toLowerCase() + (el.id ? '#' + el.id : '') +
    (el.className && typeof el.className === 'string' ? '.' + el.className.trim().split(/\\s+/)[0] : '');
  const text = el => (el.innerText || el.textContent || '').trim().replace(/\\s+/g, ' ').slice(0, 60);
  const shown = el => { const r = el.getBoundingClientRect(); const st = getComputedStyle(el);
    return r.width > 0 && r.height > 0 && st.visibility !== 'hidden' && st.display !== 'none'; };
  for (const el of col.querySelectorAll('p, li, dt, dd, pre, table, caption, h1, h2, h3, h4, blockquote, ' +
                                       '.admonition, .cell_output, .output, svg, img, .vega-embed, .math, div')) {
    if (!shown(el) || el.closest('details:not([open]) > :not(summary)')) continue;
    const r = el.getBoundingClientRect(), st = getComputedStyle(el);
    if (el.tagName !== 'DIV' && (r.right > c.right + 2 || r.left < c.left - 2)) {
      const by = Math.round(Math.max(r.right - c.right, c.left - r.left));
      out.push(`${name(el)} sticks out of the column by ${by} px: "${text(el)}"`);
    } else if (['auto', 'scroll'].includes(st.overflowX) && el.scrollWidth > el.clientWidth + 2) {
      out.push(`${name(el)} scrolls sideways (${el.scrollWidth} px in ${el.clientWidth}): "${text(el)}"`);
    }
  }
  return out;
}"""

# Text of table cells and of the glance box, without the code inside them.
READABLE_JS = """(column) => {
  const col = document.querySelector(column);
  if (!col) return [];
  const out = [];
  for (const el of col.querySelectorAll('table th, table td, table caption, .admonition.tip li, .admonition.tip p')) {
    const copy = el.cloneNode(true);
    copy.querySelectorAll('code, pre, .math').forEach(c => c.remove());
    const t = (copy.textContent || '').replace(/\\s+/g, ' ').trim();
    if (t) out.push(t);
  }
  return out;
}"""

# Axes that show labels but no title, per rendered chart.
AXES_JS = """() => Array.from(document.querySelectorAll('div[id^="altair-viz-"]')).flatMap(d =>
  Array.from(d.querySelectorAll('g.role-axis')).filter(a =>
    Array.from(a.querySelectorAll('g.role-axis-label text')).some(t => t.textContent.trim()) &&
    !Array.from(a.querySelectorAll('g.role-axis-title text')).some(t => t.textContent.trim()))
  .map(a => d.id))"""


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # noqa: D401 - silence the per-request log
        pass


def serve(directory: Path) -> tuple[http.server.ThreadingHTTPServer, str]:
    handler = functools.partial(QuietHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def is_favicon(url: str) -> bool:
    return urlparse(url).path.endswith("/favicon.ico")


def pages_of(html_dir: Path) -> list[str]:
    skip = {"_static", "_sources", "_images"}
    return sorted(p.relative_to(html_dir).as_posix() for p in html_dir.rglob("*.html")
                  if not skip & set(p.relative_to(html_dir).parts))


def result_keys(results: Path) -> list[str]:
    """Headline keys of every summary.json under ``results`` with two underscores or more, underscores as spaces."""
    keys = set()
    for path in results.rglob("summary.json"):
        try:
            headline = json.loads(path.read_text(encoding="utf-8")).get("headline") or {}
        except (OSError, ValueError):
            continue
        keys |= {k.replace("_", " ") for k in headline if k.count("_") >= 2}
    return sorted(keys)


def raw_keys(texts: list[str], spaced_keys: list[str]) -> list[str]:
    """The raw keys in a page's table and findings texts: snake_case words, or result keys with spaces."""
    found = []
    for text in texts:
        found += re.findall(KEY_LIKE, text)
        low = text.lower()
        found += [k for k in spaced_keys if re.search(rf"(?<![\w-]){re.escape(k)}(?![\w-])", low)]
    return list(dict.fromkeys(found))


def reader_problems(page, spaced_keys: list[str]) -> list[str]:
    """What a reader would trip over: overflowing text, raw keys in tables or findings, untitled chart axes."""
    problems = [f"overflow: {o}" for o in page.evaluate(OVERFLOW_JS, COLUMN)[:5]]
    if not problems:
        page.set_viewport_size({"width": WIDTH - HEADROOM_PX, "height": HEIGHT})
        page.wait_for_timeout(100)
        problems = [f"overflow at {WIDTH - HEADROOM_PX} px (no headroom): {o}"
                    for o in page.evaluate(OVERFLOW_JS, COLUMN)[:5]]
        page.set_viewport_size({"width": WIDTH, "height": HEIGHT})
        page.wait_for_timeout(100)
    problems += [f"raw key in a table or the findings: {k}" for k in raw_keys(page.evaluate(READABLE_JS, COLUMN),
                                                                               spaced_keys)[:5]]
    problems += [f"chart axis without a title: #{c}" for c in dict.fromkeys(page.evaluate(AXES_JS))]
    return problems


def check_page(context, base: str, rel: str, timeout_s: float, shot: Path | None, redirect: bool = False,
               spaced_keys: list[str] | None = None) -> list[str]:
    problems: list[str] = []
    page = context.new_page()

    def on_console(msg):
        if msg.type != "error" or any(b in msg.text for b in BENIGN_JS):
            return
        loc = (msg.location or {}).get("url", "")
        if msg.text.startswith("Failed to load resource") and (is_favicon(loc) or not loc.startswith(base)):
            return  # favicon 404, or an external request we aborted (already recorded)
        problems.append(f"console error: {msg.text[:200]}")

    def on_pageerror(err):
        text = str(err)
        if not any(b in text for b in BENIGN_JS):
            problems.append(f"page error: {text[:200]}")

    def on_response(resp):
        if resp.url.startswith(base) and resp.status >= 400 and not is_favicon(resp.url):
            problems.append(f"HTTP {resp.status}: {resp.url[len(base):]}")

    def on_failed(req):
        if req.url.startswith(base) and not is_favicon(req.url):
            problems.append(f"request failed: {req.url[len(base):]} ({req.failure})")

    page.on("console", on_console)
    page.on("pageerror", on_pageerror)
    page.on("response", on_response)
    page.on("requestfailed", on_failed)
    try:
        if redirect:  # e.g. index.html -> book/intro.html: check the page it lands on
            page.goto(f"{base}/{rel}", wait_until="commit", timeout=timeout_s * 1000)
            page.wait_for_url(lambda u: not u.endswith("/" + rel), timeout=timeout_s * 1000)
        page.goto(page.url if redirect else f"{base}/{rel}", wait_until="load", timeout=timeout_s * 1000)
        page.evaluate("() => document.querySelectorAll('img[loading=lazy]').forEach(i => i.loading = 'eager')")
        try:
            page.wait_for_function(
                "() => Array.from(document.images).every(i => i.complete) && "
                "Array.from(document.querySelectorAll('div[id^=\"altair-viz-\"]'))"
                ".every(d => d.querySelector('svg, canvas, .error'))",
                timeout=timeout_s * 1000)
        except Exception:  # noqa: BLE001 - reported in detail below
            pass
        page.wait_for_timeout(200)  # let late console errors arrive
        charts = page.evaluate(CHARTS_JS)
        problems += [f"chart not rendered: #{c['id']}" for c in charts if not c["ok"]]
        problems += [f"image not loaded: {src}" for src in page.evaluate(IMAGES_JS)]
        problems += reader_problems(page, spaced_keys or [])
        if shot is not None:
            shot.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(shot), full_page=True)
        return problems + ([f"({len(charts)} charts)"] if charts and not problems else [])
    except Exception as exc:  # noqa: BLE001
        return problems + [f"could not load: {str(exc).splitlines()[0]}"]
    finally:
        page.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--html", default=str(ROOT / "_build" / "src" / "_build" / "html"))
    ap.add_argument("--screenshots", default=str(ROOT / "_build" / "screenshots"))
    ap.add_argument("--results", default=str(ROOT / "results"), help="where the result keys checked for are read")
    ap.add_argument("--timeout", type=float, default=20.0, help="seconds per page")
    ap.add_argument("--max-seconds", type=float, default=900.0, help="whole-run watchdog: dump stacks and exit")
    args = ap.parse_args(argv)
    faulthandler.dump_traceback_later(args.max_seconds, exit=True)  # never hang CI silently
    html_dir = Path(args.html)
    if not html_dir.is_dir() or not pages_of(html_dir):
        print(f"error: no html pages in {html_dir} (build the book first)", file=sys.stderr)
        return 2
    if not Path(CHROMIUM).exists():
        print(f"error: {CHROMIUM} not found (apt-get install -y chromium)", file=sys.stderr)
        return 2
    from playwright.sync_api import sync_playwright

    spaced_keys = result_keys(Path(args.results))
    server, base = serve(html_dir)
    external: list[str] = []
    passed = failed = 0
    t0 = time.perf_counter()
    try:
        with sync_playwright() as pw, tempfile.TemporaryDirectory(prefix="morphbook-chromium-") as profile:
            context = pw.chromium.launch_persistent_context(
                profile, executable_path=CHROMIUM, headless=True, args=FLAGS, service_workers="block",
                viewport={"width": WIDTH, "height": HEIGHT})

            def route(r):
                u = urlparse(r.request.url)
                if u.scheme in ("http", "https", "ws", "wss") and u.hostname not in LOCAL_HOSTS:
                    external.append(r.request.url)
                    return r.abort()
                return r.continue_()

            context.route("**/*", route)
            shots = Path(args.screenshots)
            for rel in pages_of(html_dir):
                external.clear()
                shot = shots / (rel.replace("/", "__").removesuffix(".html") + ".png")
                text = (html_dir / rel).read_text(encoding="utf-8", errors="replace")[:2000].lower()
                redirect = 'http-equiv="refresh"' in text
                problems = check_page(context, base, rel, args.timeout, shot if _wants_shot(rel) else None, redirect,
                                      spaced_keys)
                problems += [f"external request blocked: {u}" for u in dict.fromkeys(external)]
                bad = [p for p in problems if not p.startswith("(")]
                if bad:
                    failed += 1
                    print(f"FAIL {rel}: " + "; ".join(bad), flush=True)
                else:
                    passed += 1
                    print(f"ok   {rel} {' '.join(problems)}".rstrip(), flush=True)
            context.close()
    finally:
        server.shutdown()
    print(f"checked in {time.perf_counter() - t0:.1f} s; screenshots ({WIDTH} px wide) in {args.screenshots}")
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


def _wants_shot(rel: str) -> bool:
    """The intro page, the benchmarks page and every chapter page get a full-page screenshot."""
    return rel.endswith(("intro.html", "benchmarks.html")) or rel.startswith("notebooks/")


if __name__ == "__main__":
    sys.exit(main())
