"""The upload page in a real headless Chromium against a real hypercorn (issue 5).

Debian's `chromium` package driven by Playwright for Python: Playwright's own browser
download is never used (`executable_path` points at the system Chromium). Where either
is missing, every test here skips and says how to install it.

Uploads are throttled through the DevTools protocol where a test needs to see them in
flight (progress, speed, cancel): on loopback a 20 MiB upload is otherwise over before
the page can show anything between 0 and 100%.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx
import pytest

from support import ROOT, HeldUpload, Server, assert_nothing_stored, assert_stored, file_part, form_body, stored_ids

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
ARTIFACTS = ROOT / "tests" / "artifacts"
MiB = 1024 * 1024
TIMEOUT_MS = 30_000
XSS_NAMES = ["<img src=x onerror=alert(1)>.txt", '"><svg onload=alert(2)>.txt']

# Records what the page shows while it works: every value the progress bars take and
# every text the stats lines show, in order.
RECORDER = """() => {
  window.__seen = {progress: [], stats: []};
  new MutationObserver((mutations) => {
    for (const m of mutations) {
      if (m.type === "attributes" && m.target.tagName === "PROGRESS") {
        window.__seen.progress.push(Number(m.target.getAttribute("value")));
      }
      const stats = (m.target.nodeType === 1 ? m.target : m.target.parentElement).closest(".stats");
      if (stats) { window.__seen.stats.push(stats.textContent); }
    }
  }).observe(document.getElementById("rows"),
             {subtree: true, childList: true, characterData: true, attributes: true, attributeFilter: ["value"]});
}"""


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists():
        pytest.skip("no /usr/bin/chromium: `apt-get install chromium` to run the browser tests")
    sync_api = pytest.importorskip(
        "playwright.sync_api",
        reason="no Playwright: `pip install playwright` (no `playwright install`: the system Chromium is used)",
    )
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def expect(browser: Any) -> Callable[..., Any]:
    from playwright.sync_api import expect

    expect.set_options(timeout=TIMEOUT_MS)
    return expect


@dataclass
class Tab:
    """One page in its own browser context, with what it did recorded."""

    page: Any
    context: Any
    dialogs: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    posts: list[Any] = field(default_factory=list)  # playwright Request objects

    def row(self, name: str) -> Any:
        return self.page.locator("#rows tr").filter(has=self.page.get_by_role("rowheader", name=name, exact=True))

    def seen(self) -> dict[str, list[Any]]:
        return self.page.evaluate("window.__seen")

    def throttle(self, bytes_per_second: int) -> None:
        cdp = self.context.new_cdp_session(self.page)
        cdp.send("Network.enable")
        cdp.send("Network.emulateNetworkConditions", {
            "offline": False, "latency": 0, "downloadThroughput": -1, "uploadThroughput": bytes_per_second,
        })

    def screenshot(self, name: str) -> Path:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / name
        self.page.screenshot(path=str(path), full_page=True)
        return path


@pytest.fixture
def open_tab(browser: Any) -> Iterator[Callable[..., Tab]]:
    """open_tab(url, width=..., block_health=..., health=...) -> a loaded upload page; closed after the test."""
    tabs: list[Tab] = []

    def open_tab(url: str, width: int = 1200, height: int = 900, block_health: bool = False,
                 health: tuple[int, str] | None = None) -> Tab:
        context = browser.new_context(viewport={"width": width, "height": height})
        context.set_default_timeout(TIMEOUT_MS)
        page = context.new_page()
        tab = Tab(page, context)
        tabs.append(tab)
        page.on("dialog", lambda dialog: (tab.dialogs.append(dialog.message), dialog.dismiss()))
        page.on("pageerror", lambda error: tab.errors.append(str(error)))
        page.on("request", lambda request: tab.posts.append(request) if request.method == "POST" else None)
        if block_health:
            # What an old server or a proxy in the way looks like: no limits known up front.
            page.route("**/health", lambda route: route.abort())
        elif health is not None:  # (status, JSON body) in place of the server's
            page.route("**/health", lambda route: route.fulfill(
                status=health[0], body=health[1], content_type="application/json"))
        page.goto(url)
        if not block_health:
            wait_for_page(page, "document.getElementById('zone-help').textContent.includes('up to')")
        page.evaluate(RECORDER)
        return tab

    yield open_tab
    for tab in tabs:
        tab.context.close()
    assert [tab.errors for tab in tabs if tab.errors] == []  # no JavaScript error on any page


def wait_for_page(page, expression: str, timeout: float = 30.0) -> None:
    """Poll a page expression from here: Playwright's wait_for_function polls with
    eval inside the page, which the page's Content-Security-Policy forbids."""
    deadline = time.monotonic() + timeout
    while not page.evaluate(expression):
        assert time.monotonic() < deadline, f"timed out waiting for {expression}"
        time.sleep(0.05)


def write_file(directory: Path, name: str, data: bytes) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_bytes(data)
    return path


def stored_record(upload_dir: Path, file_id: str) -> dict[str, Any]:
    return json.loads((upload_dir / f"{file_id}.json").read_text())


def wait_until(check: Callable[[], None], timeout: float = 10.0) -> None:
    """Retry an assertion until it holds (the server cleans up after the browser has moved on)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            check()
            return
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_big_file_progress_speed_and_sha256(open_tab, expect, tmp_path, upload_dir):
    data = os.urandom(20 * MiB)
    path = write_file(tmp_path / "files", "big.bin", data)
    digest = hashlib.sha256(data).hexdigest()
    with Server(upload_dir, env={"UPLOAD_FSYNC": "0"}) as server:
        tab = open_tab(server.url + "/")
        page = tab.page
        expect(page.get_by_label("Upload token")).to_be_hidden()  # no token configured
        tab.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=server.url)
        page.get_by_label("Description").fill("release build")
        tab.throttle(20_000_000)  # ~1 s for 20 MiB: long enough to be seen in flight
        page.set_input_files("#picker", str(path))
        row = tab.row("big.bin")
        expect(row).to_have_attribute("data-state", "done")

        seen = tab.seen()
        progress = seen["progress"]
        assert progress[-1] == 100
        assert progress == sorted(progress), "the bar never moves back"
        assert any(0 < value < 100 for value in progress), progress  # it moved while sending
        live = [text for text in seen["stats"] if text.endswith("left")]
        assert live, seen["stats"]
        assert re.fullmatch(r"[\d.]+ (B|KiB|MiB) of 20\.0 MiB · [\d.]+ (KiB|MiB)/s · (under )?[\d.]+ s left", live[-1]), live

        expect(row.get_by_role("progressbar")).to_have_attribute("value", "100")
        expect(row.locator(".pct")).to_have_text("100%")
        expect(row.locator("td.size")).to_have_text("20.0 MiB")
        expect(row.locator("td.sha code")).to_have_text(digest)
        expect(row.locator(".msg")).to_have_text("✓ Stored")
        expect(page.locator("#status")).to_have_text("Finished: 1 stored.")
        file_id = row.locator("td.id code").text_content()
        record = stored_record(upload_dir, file_id)
        assert record["sha256"] == digest and record["description"] == "release build"
        assert_stored(upload_dir, record, data)

        row.get_by_role("button", name="Copy the SHA-256 of big.bin").click()
        expect(row.get_by_role("button", name="Copy the SHA-256 of big.bin")).to_have_text("Copied")
        assert page.evaluate("navigator.clipboard.readText()") == digest
        tab.screenshot("page-desktop.png")
    assert tab.posts and all(post.url == server.url + "/upload" for post in tab.posts)


def test_three_files_at_once(open_tab, expect, tmp_path, upload_dir):
    contents = {"one.bin": os.urandom(3 * MiB + 17), "two.txt": b"two\r\n" * 20_000, "empty.dat": b""}
    paths = [str(write_file(tmp_path / "files", name, data)) for name, data in contents.items()]
    with Server(upload_dir, env={"UPLOAD_FSYNC": "0"}) as server:
        tab = open_tab(server.url + "/")
        tab.page.set_input_files("#picker", paths)
        for name, data in contents.items():
            row = tab.row(name)
            expect(row).to_have_attribute("data-state", "done")
            expect(row.locator("td.sha code")).to_have_text(hashlib.sha256(data).hexdigest())
            assert_stored(upload_dir, stored_record(upload_dir, row.locator("td.id code").text_content()), data)
        expect(tab.row("empty.dat").locator("td.size")).to_have_text("0 B")
        expect(tab.row("two.txt").locator("td.size")).to_have_text("97.7 KiB")
        expect(tab.page.locator("#status")).to_have_text("Finished: 3 stored.")
        tab.page.get_by_role("button", name="Clear finished").click()
        expect(tab.page.locator("#rows tr")).to_have_count(0)
        expect(tab.page.get_by_role("heading", name="Uploads")).to_be_hidden()
    assert len(stored_ids(upload_dir)) == 3
    assert len(tab.posts) == 3  # one request per file


def test_dropped_files_upload(open_tab, expect, upload_dir):
    """Files dropped on the zone go the same way as picked ones (a synthetic drop: the
    page builds the DataTransfer, since Playwright cannot drag from the desktop)."""
    contents = {"dropped-a.txt": b"first dropped file\r\n" * 500, "dropped-b.bin": bytes(range(256)) * 40}
    with Server(upload_dir, env={"UPLOAD_FSYNC": "0"}) as server:
        tab = open_tab(server.url + "/")
        transfer = tab.page.evaluate_handle(
            """(files) => {
                const transfer = new DataTransfer();
                for (const [name, bytes] of files) {
                    transfer.items.add(new File([new Uint8Array(bytes)], name));
                }
                return transfer;
            }""",
            [[name, list(data)] for name, data in contents.items()],
        )
        tab.page.dispatch_event("#picker", "dragover", {"dataTransfer": transfer})
        tab.page.dispatch_event("#picker", "drop", {"dataTransfer": transfer})
        for name, data in contents.items():
            row = tab.row(name)
            expect(row).to_have_attribute("data-state", "done")
            expect(row.locator("td.sha code")).to_have_text(hashlib.sha256(data).hexdigest())
            assert_stored(upload_dir, stored_record(upload_dir, row.locator("td.id code").text_content()), data)
    assert len(stored_ids(upload_dir)) == 2


def test_over_limit_file_shows_the_servers_413(open_tab, expect, tmp_path, upload_dir):
    big = write_file(tmp_path / "files", "too-big.bin", os.urandom(4 * MiB))
    small_data = b"fits" * 100
    small = write_file(tmp_path / "files", "small.txt", small_data)
    with Server(upload_dir, env={"UPLOAD_FSYNC": "0", "UPLOAD_MAX_FILE_SIZE": "64K"}) as server:
        with server.client() as http:  # what the server itself says about such a file
            refusal = http.post("/upload", files={"file": ("too-big.bin", b"x" * (65 * 1024))})
        assert refusal.status_code == 413
        detail = refusal.json()["detail"]
        assert_nothing_stored(upload_dir)

        # Without /health the page cannot know the limit: the server's 413 says it.
        tab = open_tab(server.url + "/", block_health=True)
        tab.page.set_input_files("#picker", [str(big), str(small)])
        row = tab.row("too-big.bin")
        expect(row).to_have_attribute("data-state", "error")
        expect(row.locator(".msg")).to_have_text(f"Too large (413): {detail}")
        expect(row.get_by_role("button", name="Retry upload of too-big.bin")).to_be_visible()
        expect(tab.row("small.txt")).to_have_attribute("data-state", "done")  # errors are per file
        expect(tab.page.locator("#status")).to_have_text("Finished: 1 stored, 1 failed.")
        tab.screenshot("page-413.png")
        (only,) = stored_ids(upload_dir)
        assert_stored(upload_dir, stored_record(upload_dir, only), small_data)

        # With /health the page refuses the file itself, before sending a byte.
        tab = open_tab(server.url + "/")
        expect(tab.page.locator("#zone-help")).to_contain_text("up to 64.0 KiB each")
        tab.page.set_input_files("#picker", str(big))
        row = tab.row("too-big.bin")
        expect(row).to_have_attribute("data-state", "error")
        expect(row.locator(".msg")).to_have_text("Too large: the server takes files up to 64.0 KiB (65,536 bytes).")
        assert tab.posts == []
    assert stored_ids(upload_dir) == [only]


def take_the_only_slot(server: Server) -> HeldUpload:
    """An upload held part-way, in the one slot of UPLOAD_MAX_CONCURRENT=1."""
    held = HeldUpload(server.port, form_body([file_part(b"x" * 100_000, "held.bin")]), 1000)
    with server.client() as http:
        def slot_taken() -> None:
            assert http.get("/health").json()["uploads_in_flight"] == 1

        wait_until(slot_taken)
    return held


def test_a_busy_server_gets_the_file_again_after_its_retry_after(open_tab, expect, tmp_path, upload_dir):
    """Every upload slot taken (UPLOAD_MAX_CONCURRENT): the server answers 503 with Retry-After before
    storing anything. The page sends the file again after that wait, and it is stored once a slot is
    free; a file cancelled while it waits is not sent again; files waiting count as uploading."""
    kept_data = b"worth the wait " * 100
    kept = write_file(tmp_path / "files", "kept.txt", kept_data)
    dropped = write_file(tmp_path / "files", "dropped.txt", b"never stored")
    late = write_file(tmp_path / "files", "late.txt", b"picked while the others wait")
    with Server(upload_dir, env={"UPLOAD_FSYNC": "0", "UPLOAD_MAX_CONCURRENT": "1"}) as server:
        held = take_the_only_slot(server)
        tab = open_tab(server.url + "/")
        tab.page.set_input_files("#picker", [str(kept), str(dropped)])
        for name in ("kept.txt", "dropped.txt"):
            expect(tab.row(name).locator(".stats")).to_contain_text("The server is busy; trying again in")
            expect(tab.row(name).locator("progress")).to_have_attribute("value", "0")  # nothing stored yet
        tab.page.set_input_files("#picker", str(late))
        expect(tab.page.locator("#status")).to_have_text("Uploading 3 file(s)\u2026")
        tab.row("dropped.txt").get_by_role("button", name="Cancel upload of dropped.txt").click()
        expect(tab.row("dropped.txt")).to_have_attribute("data-state", "cancelled")
        expect(tab.row("dropped.txt").locator(".msg")).to_have_text("Cancelled before it was sent again.")
        status, held_record = held.finish()
        assert status == 201
        held.close()
        expect(tab.row("kept.txt")).to_have_attribute("data-state", "done")
        expect(tab.row("late.txt")).to_have_attribute("data-state", "done")
        expect(tab.page.locator("#status")).to_have_text("Finished: 2 stored, 1 cancelled.")
        assert len(tab.posts) >= 5  # each refused once, then kept.txt and late.txt sent again
        time.sleep(1.5)  # past the Retry-After: the cancelled file is not sent again
        # The page sends no more at once than the server takes (max_concurrent 1): nothing refused.
        tab = open_tab(server.url + "/")
        tab.throttle(2_000_000)
        tab.page.set_input_files("#picker", [str(write_file(tmp_path / "more", f"m{i}.bin", os.urandom(MiB)))
                                             for i in range(3)])
        expect(tab.page.locator("#status")).to_have_text("Finished: 3 stored.")
        assert len(tab.posts) == 3
    kept_ids = [i for i in stored_ids(upload_dir) if stored_record(upload_dir, i)["filename"] == "kept.txt"]
    assert len(kept_ids) == 1 and len(stored_ids(upload_dir)) == 6  # held.bin, kept.txt, late.txt, m0-m2
    assert_stored(upload_dir, stored_record(upload_dir, kept_ids[0]), kept_data)


def test_a_stalled_upload_says_so_instead_of_its_last_speed(open_tab, expect, tmp_path, upload_dir):
    """A stalled connection sends no progress events: the row's speed must not stay as it was. The
    server stops reading (its worker stopped), the row says "stalled"; then the upload goes on."""
    data = os.urandom(24 * MiB)
    slow = write_file(tmp_path / "files", "slow.bin", data)
    with Server(upload_dir, env={"UPLOAD_FSYNC": "0"}) as server:
        tab = open_tab(server.url + "/")
        tab.throttle(2_000_000)  # ~12 s in all: the stall comes long before the end
        tab.page.set_input_files("#picker", str(slow))
        row = tab.row("slow.bin")
        expect(row.locator(".stats")).to_contain_text("/s \u00b7")  # a speed, while bytes flow
        workers = server.pids()[1:]
        for pid in workers:
            os.kill(pid, signal.SIGSTOP)
        try:
            expect(row.locator(".stats")).to_contain_text("\u00b7 stalled", timeout=30_000)
            expect(row.locator(".stats")).not_to_contain_text("/s")
        finally:
            for pid in workers:
                os.kill(pid, signal.SIGCONT)
        expect(row.locator(".stats")).to_contain_text("/s \u00b7")
        expect(row).to_have_attribute("data-state", "done", timeout=60_000)
        slow_id = row.locator("td.id code").text_content()
    assert_stored(upload_dir, stored_record(upload_dir, slow_id), data)


def test_a_file_in_pieces_waits_out_a_busy_server_s_retry_after(open_tab, expect, tmp_path, upload_dir):
    """The resumable path's retries wait at least the Retry-After of a 503 (1 s), not only their own
    schedule (0.5 s first); the file is stored once the slot is free."""
    data = os.urandom(2 * MiB)
    pieces = write_file(tmp_path / "files", "pieces.bin", data)
    env = {"UPLOAD_FSYNC": "0", "UPLOAD_MAX_CONCURRENT": "1", "UPLOAD_MAX_REQUEST_SIZE": "1M"}
    with Server(upload_dir, env=env) as server:
        held = take_the_only_slot(server)
        tab = open_tab(server.url + "/")
        creations: list[float] = []

        def creation(route: Any) -> None:  # held until handled here: the next one comes after the wait
            creations.append(time.monotonic())
            route.continue_()

        tab.page.route("**/files", creation)
        tab.page.set_input_files("#picker", str(pieces))
        row = tab.row("pieces.bin")
        expect(row.locator(".stats")).to_contain_text("The server answered 503; trying again in 1.0 s")
        deadline = time.monotonic() + 10
        while len(creations) < 2 and time.monotonic() < deadline:
            tab.page.wait_for_timeout(50)  # the sync API runs the route handler only inside its calls
        assert creations[1] - creations[0] >= 0.95
        status, _ = held.finish()
        assert status == 201
        held.close()
        expect(row).to_have_attribute("data-state", "done")
        pieces_id = row.locator("td.id code").text_content()
    assert_stored(upload_dir, stored_record(upload_dir, pieces_id), data)


def test_a_file_over_the_request_limit_goes_in_pieces_within_it(open_tab, expect, tmp_path, upload_dir):
    """UPLOAD_MAX_REQUEST_SIZE below UPLOAD_MAX_FILE_SIZE (a proxy's body limit, say): a file one POST
    would carry past the request limit goes resumably, in PATCHes within it; only the file limit
    refuses a file up front."""
    big_data = os.urandom(3 * MiB + 5)
    big = write_file(tmp_path / "files", "big.bin", big_data)
    small = write_file(tmp_path / "files", "small.txt", b"one post" * 100)
    huge = write_file(tmp_path / "files", "huge.bin", os.urandom(8 * MiB + 1))
    env = {"UPLOAD_FSYNC": "0", "UPLOAD_MAX_FILE_SIZE": "8M", "UPLOAD_MAX_REQUEST_SIZE": "1M"}
    with Server(upload_dir, env=env) as server:
        tab = open_tab(server.url + "/")
        expect(tab.page.locator("#zone-help")).to_contain_text("up to 8.0 MiB each")
        patches = []
        tab.page.on("request", lambda request: patches.append(request) if request.method == "PATCH" else None)
        tab.page.set_input_files("#picker", [str(big), str(small), str(huge)])
        expect(tab.row("huge.bin").locator(".msg")).to_have_text(
            "Too large: the server takes files up to 8.0 MiB (8,388,608 bytes).")
        for name in ("big.bin", "small.txt"):
            expect(tab.row(name)).to_have_attribute("data-state", "done")
        expect(tab.page.locator("#status")).to_have_text("Finished: 2 stored, 1 failed.")
        assert len(patches) == 4  # 3 MiB + 5 bytes in pieces of 1 MiB
        assert [request.url.endswith("/upload") for request in tab.posts].count(True) == 1  # small.txt
        big_id = tab.row("big.bin").locator("td.id code").text_content()
        assert_stored(upload_dir, stored_record(upload_dir, big_id), big_data)
        # A 503 /health (its store unavailable a moment) still names the limits: the same choices.
        with server.client() as http:
            facts = http.get("/health").json()
        tab = open_tab(server.url + "/", health=(503, json.dumps({**facts, "status": "unavailable"})))
        expect(tab.page.locator("#zone-help")).to_contain_text("up to 8.0 MiB each")
        tab.page.set_input_files("#picker", [str(big), str(huge)])
        expect(tab.row("huge.bin")).to_have_attribute("data-state", "error")
        expect(tab.row("big.bin")).to_have_attribute("data-state", "done")
        assert tab.posts == [request for request in tab.posts if "/upload" not in request.url]  # no POST /upload
        # Cancel with a token no header can carry: the row is cancelled all the same (no script error).
        tab = open_tab(server.url + "/")
        tab.throttle(300_000)
        tab.page.set_input_files("#picker", str(big))
        wait_for_page(tab.page, "Number(document.querySelector('#rows progress').value) > 0")
        tab.page.evaluate("document.getElementById('token').value = 'x\u20ac'")
        tab.row("big.bin").get_by_role("button", name="Cancel upload of big.bin").click()
        expect(tab.row("big.bin")).to_have_attribute("data-state", "cancelled")
        expect(tab.row("big.bin").locator(".stats")).to_have_text("Not stored.")
        expect(tab.page.locator("#status")).to_have_text("Finished: 1 cancelled.")
    assert len(stored_ids(upload_dir)) == 3


def test_hostile_filenames_render_as_text(open_tab, expect, tmp_path, upload_dir):
    paths = [str(write_file(tmp_path / "files", name, name.encode())) for name in XSS_NAMES]
    with Server(upload_dir, env={"UPLOAD_FSYNC": "0"}) as server:
        tab = open_tab(server.url + "/")
        tab.page.set_input_files("#picker", paths)
        for name in XSS_NAMES:
            row = tab.row(name)
            expect(row).to_have_attribute("data-state", "done")
            expect(row.get_by_role("rowheader")).to_have_text(name)
            # Chromium sends '"' in a filename as %22 (HTML's multipart/form-data encoding);
            # the server keeps what it got, and the page says so next to the file.
            sent = name.replace('"', "%22")
            record = stored_record(upload_dir, row.locator("td.id code").text_content())
            assert record["filename"] == sent
            stored_as = "✓ Stored" if sent == name else f"✓ Stored as “{sent}”"
            expect(row.locator(".msg")).to_have_text(stored_as)
        tab.page.wait_for_timeout(300)  # an onerror/onload handler would have fired by now
        assert tab.page.locator("#rows img, #rows svg, #rows script").count() == 0
        assert tab.dialogs == []
        tab.screenshot("page-hostile-names.png")


def test_mounted_under_a_prefix(open_tab, expect, tmp_path, upload_dir):
    data = os.urandom(256 * 1024)
    path = write_file(tmp_path / "files", "mounted.bin", data)
    with Server(upload_dir, app="mounted_app:app", env={"UPLOAD_FSYNC": "0"}) as server:
        assert httpx.get(server.url + "/upload").status_code == 404  # nothing outside the mount
        tab = open_tab(server.url + "/files")  # no trailing slash: the page must not rely on one
        tab.page.set_input_files("#picker", str(path))
        row = tab.row("mounted.bin")
        expect(row).to_have_attribute("data-state", "done")
        expect(row.locator("td.sha code")).to_have_text(hashlib.sha256(data).hexdigest())
        file_id = row.locator("td.id code").text_content()
        assert_stored(upload_dir, stored_record(upload_dir, file_id), data)
        expect(row.get_by_role("link", name="Download mounted.bin")).to_have_attribute("href", f"/files/files/{file_id}")
    assert [post.url for post in tab.posts] == [server.url + "/files/upload"]


def test_token_field_sends_a_bearer_token(open_tab, expect, tmp_path, upload_dir):
    data = b"secret stuff\n" * 1000
    path = write_file(tmp_path / "files", "secret.txt", data)
    with Server(upload_dir, env={"UPLOAD_FSYNC": "0", "UPLOAD_TOKEN": "s3cret-token"}) as server:
        tab = open_tab(server.url + "/")
        token = tab.page.get_by_label("Upload token")
        expect(token).to_be_visible()
        token.fill("wrong")
        tab.page.set_input_files("#picker", str(path))
        row = tab.row("secret.txt")
        expect(row).to_have_attribute("data-state", "error")
        expect(row.locator(".msg")).to_have_text(
            "Not authorized (401): a valid 'Authorization: Bearer <token>' header is required."
            " Enter the token above, then Retry."
        )
        assert_nothing_stored(upload_dir)

        token.fill("s3cret-token")
        row.get_by_role("button", name="Retry upload of secret.txt").click()
        expect(row).to_have_attribute("data-state", "done")
        assert_stored(upload_dir, stored_record(upload_dir, row.locator("td.id code").text_content()), data)
    assert [post.header_value("authorization") for post in tab.posts] == ["Bearer wrong", "Bearer s3cret-token"]


def test_cancel_aborts_the_upload_and_the_server_drops_it(open_tab, expect, tmp_path, upload_dir):
    path = write_file(tmp_path / "files", "slow.bin", os.urandom(16 * MiB))
    with Server(upload_dir, env={"UPLOAD_FSYNC": "0"}) as server:
        tab = open_tab(server.url + "/")
        tab.throttle(1_000_000)  # ~17 s if nobody cancels
        tab.page.set_input_files("#picker", str(path))
        row = tab.row("slow.bin")
        wait_for_page(tab.page, "Number(document.querySelector('#rows progress').value) > 2")
        row.get_by_role("button", name="Cancel upload of slow.bin").focus()
        tab.page.keyboard.press("Enter")
        expect(row).to_have_attribute("data-state", "cancelled")
        expect(row.locator(".msg")).to_have_text("Cancelled; the server discards what it received.")
        expect(row.locator(".stats")).to_have_text("Not stored.")  # not its last speed
        retry = row.get_by_role("button", name="Retry upload of slow.bin")
        expect(retry).to_be_visible()
        expect(retry).to_be_focused()  # the pressed button is gone: the focus stays in the row
        expect(tab.page.locator("#status")).to_have_text("Finished: 1 cancelled.")
        wait_until(lambda: assert_nothing_stored(upload_dir))
        with server.client() as http:  # the server saw the client go, not a stuck upload
            assert http.get("/health").json()["uploads_in_flight"] == 0


def test_keyboard_only_in_a_narrow_window(open_tab, expect, tmp_path, upload_dir):
    data = b"typed with a keyboard\n"
    path = write_file(tmp_path / "files", "keyboard notes with a long name.txt", data)
    with Server(upload_dir, env={"UPLOAD_FSYNC": "0"}) as server:
        tab = open_tab(server.url + "/", width=360, height=740)
        page = tab.page
        # Listen before any key is pressed: Playwright turns file-chooser interception on
        # when the first listener comes, and a chooser opened before that is lost.
        choosers: list[Any] = []
        page.on("filechooser", lambda chooser: choosers.append(chooser))
        page.keyboard.press("Tab")
        expect(page.get_by_label("Description")).to_be_focused()
        page.keyboard.type("from the keyboard")
        page.keyboard.press("Tab")
        picker = page.get_by_label("Drop files here or choose files")
        expect(picker).to_be_focused()
        assert page.eval_on_selector("#zone", "zone => getComputedStyle(zone).outlineStyle") == "solid"
        page.keyboard.press("Space")
        deadline = time.monotonic() + TIMEOUT_MS / 1000
        while not choosers and time.monotonic() < deadline:
            page.wait_for_timeout(50)
        (chooser,) = choosers
        chooser.set_files(str(path))
        row = tab.row(path.name)
        expect(row).to_have_attribute("data-state", "done")
        expect(page.get_by_role("progressbar", name=f"Upload progress of {path.name}")).to_have_attribute("value", "100")
        record = stored_record(upload_dir, row.locator("td.id code").text_content())
        assert record["description"] == "from the keyboard"
        assert_stored(upload_dir, record, data)
        # Nothing sticks out sideways: no horizontal scrolling at 360 px.
        assert page.evaluate("document.documentElement.scrollWidth") <= 360
        tab.screenshot("page-narrow.png")


def test_download_link_gets_the_file_back(open_tab, expect, tmp_path, upload_dir):
    data = os.urandom(300 * 1024)
    name = "résumé 2024.bin"
    path = write_file(tmp_path / "files", name, data)
    with Server(upload_dir, env={"UPLOAD_FSYNC": "0"}) as server:
        tab = open_tab(server.url + "/")
        tab.page.set_input_files("#picker", str(path))
        row = tab.row(name)
        expect(row).to_have_attribute("data-state", "done")
        file_id = row.locator("td.id code").text_content()
        link = row.get_by_role("link", name=f"Download {name}")
        expect(link).to_have_attribute("href", f"/files/{file_id}")
        with tab.page.expect_download() as info:
            link.click()
        download = info.value
        assert download.suggested_filename == name  # from Content-Disposition's filename*
        assert Path(download.path()).read_bytes() == data


def test_download_link_with_a_read_token(open_tab, expect, tmp_path, upload_dir):
    data = b"for token holders\n" * 1000
    path = write_file(tmp_path / "files", "guarded.txt", data)
    with Server(upload_dir, env={"UPLOAD_FSYNC": "0", "UPLOAD_READ_TOKEN": "r34d-token"}) as server:
        tab = open_tab(server.url + "/")
        token = tab.page.get_by_label("Upload token")
        expect(token).to_be_visible()  # reads need a token, so the page asks for one
        tab.page.set_input_files("#picker", str(path))  # uploads are open: no UPLOAD_TOKEN
        row = tab.row("guarded.txt")
        expect(row).to_have_attribute("data-state", "done")
        link = row.get_by_role("link", name="Download guarded.txt")
        link.click()
        expect(tab.page.locator("#status")).to_have_text(
            "guarded.txt: download failed: Not authorized (401): enter the token above."
        )
        token.fill("r34d-token")
        with tab.page.expect_download() as info:
            link.click()
        download = info.value
        assert download.suggested_filename == "guarded.txt"
        assert Path(download.path()).read_bytes() == data
        expect(link).to_have_text("Download")
