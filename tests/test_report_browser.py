"""The review report in a real headless browser (Chromium from the Debian packages).

Chromium is installed by the `chromium` session fixture when missing (apt-get, as root); without root and without
Chromium these tests are skipped, saying so. Screenshots go to $SPINEFRAC_TEST_ARTIFACTS (default: a folder under
pytest's temp dir); the path is printed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from test_report import ORDER, WEIRD, Page, local_target, make_model_dir, make_pred_dir

from spinefrac.report.build import CSP, REPORT_DIR, study_slug

BROWSERS = ("chromium", "chromium-browser")
INSTALL = (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "chromium"])
INSTALL_TIMEOUT_S = 900
RUN_TIMEOUT_S = 120
VIRTUAL_TIME_MS = 5000          # --virtual-time-budget: the page's load event has fired before the DOM is dumped
WINDOW = "1280,900"
QUIET = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-default-apps", "--disable-extensions",
         "--disable-domain-reliability", "--no-pings", "--metrics-recording-only",
         "--host-resolver-rules=MAP * ~NOTFOUND"]          # nothing could leave the machine even if asked
BROWSER_ONLY = "not an origin"   # net-log initiator of the browser's own background requests (no page made them)
CANARY = "http://198.51.100.7/canary.png"                  # TEST-NET-2: never a real host


@pytest.fixture(scope="session")
def chromium() -> str:
    """The Chromium binary; installed from the Debian packages when missing and we are root, else skipped."""
    found = next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)
    if found:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("Chromium is not installed and the tests are not run as root with apt-get: "
                    "install it with `apt-get install chromium` to run the browser tests")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in INSTALL:
        subprocess.run(cmd, check=True, env=env, timeout=INSTALL_TIMEOUT_S, capture_output=True)
    found = next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)
    assert found, "apt-get install chromium finished but no chromium binary is on PATH"
    return found


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory, pytestconfig) -> Path:
    """Where screenshots go: $SPINEFRAC_TEST_ARTIFACTS, else a folder under pytest's temp dir (printed)."""
    folder = Path(os.environ.get("SPINEFRAC_TEST_ARTIFACTS") or tmp_path_factory.mktemp("artifacts"))
    folder.mkdir(parents=True, exist_ok=True)
    capture = pytestconfig.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():          # shown even while pytest captures output
        print(f"\nreport screenshots: {folder}", flush=True)
    return folder


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    """A report of the contract-built prediction folder (failed study, no-box study, `a<b&"c`)."""
    from spinefrac.report import write_report

    root = tmp_path_factory.mktemp("browser")
    return write_report(make_pred_dir(root, model=make_model_dir(root)))


def browse(chromium: str, page: Path, profile: Path, *extra: str, fragment: str = "") -> str:
    """Run headless Chromium on a local page; return its stdout (the DOM with --dump-dom)."""
    cmd = [chromium, *QUIET, f"--user-data-dir={profile}", f"--virtual-time-budget={VIRTUAL_TIME_MS}",
           f"--window-size={WINDOW}", *extra, page.resolve().as_uri() + fragment]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def dom(chromium: str, page: Path, tmp_path: Path) -> Page:
    parsed = Page()
    parsed.feed(browse(chromium, page, tmp_path / "profile", "--dump-dom"))
    return parsed


def image_check(page: Page, html: str) -> tuple[int, int]:
    """(loaded, total) as the page's own script counted them after the load event."""
    import re

    m = re.search(r'id="image-check"[^>]*data-loaded="(\d+)" data-total="(\d+)"', html)
    assert m, "the page's image check did not run"
    return int(m.group(1)), int(m.group(2))


def page_requests(chromium: str, page: Path, tmp_path: Path) -> list[str]:
    """URLs the page itself asked the network stack for (net log), leaving out the browser's own background calls."""
    log = tmp_path / f"{page.stem}.netlog.json"
    browse(chromium, page, tmp_path / "profile", f"--log-net-log={log}", "--net-log-capture-mode=Everything")
    events = json.loads(log.read_text())
    kinds = {v: k for k, v in events["constants"]["logEventTypes"].items()}
    urls = {}
    for e in events["events"]:
        params = e.get("params") or {}
        if "url" in params:
            urls.setdefault(e["source"]["id"], params["url"])
    begin = events["constants"]["logEventPhase"]["PHASE_BEGIN"]
    return [urls.get(e["source"]["id"], "?") for e in events["events"]
            if kinds[e["type"]] == "URL_REQUEST_START_JOB" and e.get("phase") == begin
            and (e.get("params") or {}).get("initiator") != BROWSER_ONLY]


def test_index_in_the_browser_shows_rows_in_rank_order(chromium, report, artifacts, tmp_path):
    html = browse(chromium, report, tmp_path / "profile", "--dump-dom")
    page = Page()
    page.feed(html)
    assert [r["data-uid"] for r in page.rows] == ORDER
    assert [int(r["data-rank"]) for r in page.rows] == [1, 2, 3, 4, 5]
    loaded, total = image_check(page, html)
    assert total == 4 and loaded == total                      # every thumbnail (the failed study has none)
    assert 'id="shown" class="note">5 of 5 shown<' in html                 # the page's script ran
    shot = artifacts / "report_index.png"
    browse(chromium, report, tmp_path / "profile", f"--screenshot={shot}")
    assert shot.stat().st_size > 0


@pytest.mark.parametrize("show, expected", [("flagged", ["1.2.high", WEIRD]), ("failed", ["1.2.failed"]),
                                            ("either", ["1.2.failed", "1.2.high", WEIRD])])
def test_index_filter_for_flagged_and_failed(chromium, report, tmp_path, show, expected):
    html = browse(chromium, report, tmp_path / "profile", "--dump-dom", fragment=f"#{show}")
    page = Page()
    page.feed(html)
    visible = [r["data-uid"] for r in page.rows if "hidden" not in r.get("class", "").split()]
    assert visible == expected
    assert f"{len(expected)} of 5 shown" in html


def test_study_page_in_the_browser_loads_every_image(chromium, report, artifacts, tmp_path):
    page_path = report.parent / "studies" / f"{study_slug(WEIRD)}.html"
    html = browse(chromium, page_path, tmp_path / "profile", "--dump-dom")
    page = Page()
    page.feed(html)
    loaded, total = image_check(page, html)
    assert total == 3 and loaded == total                       # score profile + two overlay slices
    assert WEIRD in "".join(page.text)
    for url in page.srcs + page.hrefs:                          # the DOM the browser built links only inside
        local_target(page_path, url, report.parent)
    shot = artifacts / "report_study.png"
    browse(chromium, page_path, tmp_path / "profile", f"--screenshot={shot}")
    assert shot.stat().st_size > 0


def test_a_missing_image_is_reported_on_the_page(chromium, report, tmp_path):
    copy = tmp_path / REPORT_DIR
    shutil.copytree(report.parent, copy)
    slug = study_slug(WEIRD)
    next((copy / "studies" / slug).glob("01_slice*.png")).unlink()
    html = browse(chromium, copy / "studies" / f"{slug}.html", tmp_path / "profile", "--dump-dom")
    assert image_check(Page(), html) == (2, 3)
    assert "1 of 3 images did not load" in html


def test_no_request_leaves_the_folder(chromium, report, tmp_path):
    # the method sees a page's request: a page without the CSP asking for a remote image shows up in the log
    bare = tmp_path / "canary.html"
    bare.write_text(f'<!DOCTYPE html><html><body><img src="{CANARY}"></body></html>')
    assert CANARY in page_requests(chromium, bare, tmp_path)
    # the report's CSP blocks even an injected remote image
    guarded = tmp_path / "guarded.html"
    guarded.write_text(f'<!DOCTYPE html><html><head><meta http-equiv="Content-Security-Policy" content="{CSP}">'
                       f'</head><body><img src="{CANARY}"></body></html>')
    assert page_requests(chromium, guarded, tmp_path) == []
    # the report's own pages ask the network for nothing (their images are file:// loads inside the folder)
    for page in (report, report.parent / "studies" / f"{study_slug(WEIRD)}.html",
                 report.parent / "studies" / f"{study_slug('1.2.failed')}.html"):
        assert page_requests(chromium, page, tmp_path) == [], page
