"""``retest serve``'s pages (issue 16): a real server on a real ledger of real gate decisions,
read over HTTP and in a real browser (headless Chromium driven by Selenium).

The ledger holds what gates decided on a real repository: a merge, a red branch whose name is
hostile HTML (``x"><script>alert(1)</script>``), and a timeout of a pytest-xdist suite whose
two workers hang in a test each. The browser tests skip only where no Chromium or no
chromedriver can be found (``RETEST_REQUIRE_BROWSER=1``, set by ``.ci/run``, makes that a
failure). Screenshots are kept in the test's tmp folder, copied to ``RETEST_ARTIFACTS_DIR``
where set (``.ci/run``: ``ci-artifacts/``); ``RETEST_UPDATE_SCREENSHOTS=1`` also writes them
to ``docs/`` for the README.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import textwrap
from pathlib import Path
from typing import Any, Iterator, NamedTuple

import pytest

from conftest import descendants, pid_alive, wait_until
from gitrepo import FAILING_TEST, Repo, make_repo
from orch110_helpers import XDIST_SUITE, gate
from test_status_server import fetch, serving

pytest.importorskip("xdist", reason="pytest-xdist is part of the test extra")

HOSTILE = 'x"><script>alert(1)</script>'
HANGING = ("tests/test_hang_a.py::test_waits_for_a_service", "tests/test_hang_b.py::test_waits_too")
DEADLINE_S = 8.0
DOCS = Path(__file__).resolve().parents[1] / "docs"


class Served(NamedTuple):
    base: str
    ids: dict[str, int]
    tmp: Path


def _hanging_suite() -> dict[str, str]:
    quick = "".join(f"def test_quick_{i}():\n    assert {i} == {i}\n\n\n" for i in range(6))
    return {
        "tests/test_a_quick.py": quick,  # first: xdist hands tests out in file order
        "tests/test_hang_a.py": textwrap.dedent("""\
            import time


            def test_waits_for_a_service():
                time.sleep(60)
            """),
        "tests/test_hang_b.py": textwrap.dedent("""\
            import time


            def test_waits_too():
                time.sleep(60)
            """),
    }


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """Three real gate decisions in a real ledger, and ``retest serve`` on it."""
    root = tmp_path_factory.mktemp("pages")
    repo: Repo = make_repo(root)
    repo.branch("feature/ok", {"feature.py": "VALUE = 1\n"})
    repo.branch(HOSTILE, {"tests/test_wrong.py": FAILING_TEST})
    repo.branch("slow-xdist", _hanging_suite())
    decisions = {
        "merge": gate(repo, "feature/ok", task_id="SHOP-1"),
        "red": gate(repo, HOSTILE, task_id="SHOP-2"),
        "timeout": gate(repo, "slow-xdist", task_id="SHOP-3", command=XDIST_SUITE, timeout=DEADLINE_S),
    }
    assert [d.verdict for d in decisions.values()] == ["passed", "red", "timeout"], \
        [(d.verdict, d.rule, d.reason) for d in decisions.values()]
    with serving(repo.env, root) as base:
        status, _, body = fetch(base + "/queue")
        assert status == 200
        recent = json.loads(body)["merge_gate"]["recent"]
        ids = {d["verdict"]: d["id"] for d in recent}
        yield Served(base, {"merge": ids["passed"], "red": ids["red"], "timeout": ids["timeout"]}, root)


# --------------------------------------------------------------------------- over HTTP


def test_queue_page_lists_escapes_and_filters(served: Served) -> None:
    status, headers, body = fetch(served.base + "/")
    page = body.decode()
    assert status == 200 and headers["Content-Type"] == "text/html; charset=utf-8"
    assert headers["Content-Security-Policy"].startswith("default-src 'none'; style-src 'unsafe-inline'")
    assert "<script" not in page  # the hostile branch is text, not a tag
    assert "x&quot;&gt;&lt;script&gt;alert(1)&lt;/script&gt;" in page
    for ident in served.ids.values():
        assert f'href="/decision/{ident}"' in page
    status, _, body = fetch(served.base + "/?verdict=timeout")
    assert status == 200
    rows = [r for r in body.decode().split('<tr class="decision">')[1:]]
    assert len(rows) == 1 and f'/decision/{served.ids["timeout"]}"' in rows[0] and "SHOP-3" in rows[0]
    assert fetch(served.base + "/?verdict=<b>")[0] == 400
    assert fetch(served.base + "/?sort=age")[0] == 400


def test_decision_json_has_the_timeline_of_the_xdist_timeout(served: Served) -> None:
    status, headers, body = fetch(f"{served.base}/decision/{served.ids['timeout']}.json")
    assert status == 200 and headers["Content-Type"] == "application/json"
    doc = json.loads(body)
    assert doc["decision"]["verdict"] == "timeout" and doc["decision"]["id"] == served.ids["timeout"]
    timeline = doc["timeline"]
    assert timeline["timed_out"] and timeline["timeout_s"] == DEADLINE_S
    assert set(timeline["workers"]) == {"gw0", "gw1"}
    running = [t for t in timeline["tests"] if t["outcome"] == "running"]
    assert running and {t["nodeid"] for t in running} <= set(HANGING)
    for test in running:  # hung at the deadline: running from its start to it
        assert test["start_s"] + test["duration_s"] == pytest.approx(DEADLINE_S, abs=0.05)
    quick = [t for t in timeline["tests"] if "test_quick" in t["nodeid"]]
    assert len(quick) == 6 and all(t["outcome"] == "passed" and 0 < t["start_s"] < DEADLINE_S for t in quick)
    names = [s["name"] for s in timeline["stages"]]
    assert names[0] == "deadline" and names[-1] == "end" and "sigterm" in names
    stages = {s["name"]: s["t"] for s in timeline["stages"]}
    assert stages["deadline"] == DEADLINE_S <= stages["sigterm"] <= stages["end"]
    dumped = {d["nodeid"] for d in timeline["diagnostics"]} - {None}  # the controller runs none
    assert dumped and dumped <= set(HANGING) and all(d["text"] for d in timeline["diagnostics"])
    assert timeline["pressure"] is not None and isinstance(timeline["pressure"]["samples"], list)


def test_decision_errors_are_404_and_400(served: Served) -> None:
    assert fetch(f"{served.base}/decision/987654")[0] == 404
    assert fetch(f"{served.base}/decision/987654.json")[0] == 404
    for bad in ("/decision/abc", "/decision/1x.json", "/decision/", "/decision/-1", "/decision/1/2"):
        assert fetch(served.base + bad)[0] == 400, bad
    status, headers, _ = fetch(f"{served.base}/decision/{served.ids['merge']}", method="HEAD")
    assert status == 200 and "Content-Security-Policy" in headers


def test_decision_page_over_http_escapes_the_hostile_branch(served: Served) -> None:
    status, _, body = fetch(f"{served.base}/decision/{served.ids['red']}")
    page = body.decode()
    assert status == 200 and "<script" not in page
    assert "tests/test_wrong.py::test_add_is_wrong" in page
    assert "x&quot;&gt;&lt;script&gt;" in page


# --------------------------------------------------------------------------- in a browser


def _find(*names: str) -> str | None:
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _kill_tree(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    """Headless Chromium from the system's packages, through chromedriver; quit, and every
    process it started killed by pid, at teardown."""
    chromium = _find("chromium", "chromium-browser", "google-chrome")
    driver_path = _find("chromedriver")
    if chromium is None or driver_path is None:
        message = f"no browser to test the pages in (chromium: {chromium}, chromedriver: {driver_path}); " \
                  "apt-get install chromium chromium-driver"
        if os.environ.get("RETEST_REQUIRE_BROWSER") == "1":
            pytest.fail(f"RETEST_REQUIRE_BROWSER=1 but {message}", pytrace=False)
        pytest.skip(message)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1200,900", "--hide-scrollbars", "--no-first-run",
                f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(executable_path=driver_path, port=_free_port(),
                      log_output=str(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(service=service, options=options)
    driver_pid = service.process.pid
    try:
        yield driver
    finally:
        started = descendants(driver_pid) if pid_alive(driver_pid) else []
        try:
            driver.quit()
        finally:
            _kill_tree([driver_pid, *started])
            wait_until(lambda: not any(pid_alive(p) for p in [driver_pid, *started]), timeout=5)


def _console_errors(driver: Any) -> list[dict[str, Any]]:
    return [entry for entry in driver.get_log("browser") if entry.get("level") == "SEVERE"]


def _screenshot(driver: Any, tmp_path: Path, name: str, max_height: int = 2200) -> Path:
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1200, min(max(int(height), 600), max_height))
    shot = tmp_path / name
    assert driver.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    artifacts = os.environ.get("RETEST_ARTIFACTS_DIR", "").strip()
    if artifacts:  # CI keeps them past the run's temp dir
        os.makedirs(artifacts, exist_ok=True)
        shutil.copyfile(shot, os.path.join(artifacts, name))
    if os.environ.get("RETEST_UPDATE_SCREENSHOTS") == "1":
        shutil.copyfile(shot, DOCS / name)
    return shot


def test_queue_page_in_a_browser(served: Served, browser: Any, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    browser.get(served.base + "/")
    assert browser.title == "retest: merge gate"
    rows = browser.find_elements(By.CSS_SELECTOR, "#decisions tr.decision")
    assert len(rows) == 3
    branches = [cell.text for cell in browser.find_elements(By.CSS_SELECTOR, "#decisions td.branch")]
    assert HOSTILE in branches  # rendered as text, exactly
    assert browser.find_elements(By.TAG_NAME, "script") == []
    verdicts = {b.text for b in browser.find_elements(By.CSS_SELECTOR, "#decisions .verdict")}
    assert verdicts == {"passed", "red", "timeout"}
    assert _console_errors(browser) == []
    _screenshot(browser, tmp_path, "serve-queue.png")
    browser.find_element(By.LINK_TEXT, "timeout").click()
    assert browser.current_url.endswith("/?verdict=timeout")
    assert len(browser.find_elements(By.CSS_SELECTOR, "#decisions tr.decision")) == 1


def test_decision_page_in_a_browser_draws_the_timeline(served: Served, browser: Any, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    browser.get(f"{served.base}/decision/{served.ids['timeout']}")
    assert browser.find_element(By.CSS_SELECTOR, "h1 .verdict").text == "timeout"
    text = browser.find_element(By.TAG_NAME, "body").text
    assert any(nodeid in text for nodeid in HANGING)
    svg = browser.find_element(By.CSS_SELECTOR, "svg#timeline")
    lanes = svg.find_elements(By.CSS_SELECTOR, "g.worker-lane")
    assert sorted(lane.get_attribute("data-worker") for lane in lanes) == ["gw0", "gw1"]
    outcomes = [[b.get_attribute("data-outcome") for b in lane.find_elements(By.CSS_SELECTOR, "rect.test-bar")]
                for lane in lanes]
    assert all(outcomes) and "running" in sum(outcomes, [])
    stages = {s.get_attribute("data-stage") for s in svg.find_elements(By.CSS_SELECTOR, ".stage")}
    assert {"deadline", "sigterm", "end"} <= stages
    assert browser.find_elements(By.TAG_NAME, "script") == []
    assert _console_errors(browser) == []
    _screenshot(browser, tmp_path, "serve-decision.png", max_height=1500)


def test_hostile_branch_decision_page_in_a_browser(served: Served, browser: Any) -> None:
    from selenium.webdriver.common.by import By

    browser.get(f"{served.base}/decision/{served.ids['red']}")
    assert browser.find_element(By.CSS_SELECTOR, "dd.branch").text == HOSTILE
    assert browser.find_elements(By.TAG_NAME, "script") == []
    assert "tests/test_wrong.py::test_add_is_wrong" in browser.find_element(By.ID, "failures").text
    assert _console_errors(browser) == []
