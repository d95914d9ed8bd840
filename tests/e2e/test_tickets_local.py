"""The pages with the host app's tickets (FANOUT_VIEWER_AUTH=jwt, HS256), in real Chromium against the
real system: a ticket in the URL fragment, none at all, and an expired one replaced through postMessage
by a host page that embeds the page in an iframe."""

from __future__ import annotations

import html
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
import pytest
from playwright.sync_api import Browser, BrowserContext, Frame, Page, Request, Response, expect

from tests.e2e.conftest import PageProblems, RunningSystem, start_system
from tests.e2e.pages import VIDEO, eventually_on

pytestmark = pytest.mark.e2e

SECRET = "e2e-host-app-ticket-secret-0123456789abcdef"
ROOM = "launch"


def ticket(role: str, sub: str, *, room: str = ROOM, seconds: int = 600) -> str:
    claims = {"room": room, "sub": sub, "role": role, "exp": int(time.time()) + seconds}
    return jwt.encode(claims, SECRET, algorithm="HS256")


@pytest.fixture(scope="module")
def ticket_system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningSystem]:
    # A 15 s lease: the watch page heartbeats every 5 s, so a test sees heartbeats without waiting long.
    with start_system(
        tmp_path_factory.mktemp("tickets"),
        FANOUT_VIEWER_AUTH="jwt",
        FANOUT_TICKET_SECRET=SECRET,
        FANOUT_VIEWER_LEASE_SECONDS="15",
    ) as system:
        yield system


class ApiTraffic:
    """The API requests and answers of every page and frame of a browser context."""

    def __init__(self, context: BrowserContext) -> None:
        self.requests: list[Request] = []
        self.responses: list[Response] = []
        context.on("request", self._request)
        context.on("response", self._response)

    def _request(self, request: Request) -> None:
        if "/api/" in request.url:
            self.requests.append(request)

    def _response(self, response: Response) -> None:
        if "/api/" in response.url:
            self.responses.append(response)

    def authorizations(self, path: str) -> list[str | None]:
        """The Authorization header of each request to `path` (a suffix of the URL's path), in order."""
        return [
            request.all_headers().get("authorization")
            for request in self.requests
            if request.url.split("?", 1)[0].endswith(path)
        ]

    def statuses(self, path: str) -> list[int]:
        return [r.status for r in self.responses if r.url.split("?", 1)[0].endswith(path)]


def host_page(frame_url: str) -> str:
    """The host app's page: records what the embedded page posts, and can answer with a ticket."""
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><link rel="icon" href="data:,"></head><body>
<script>
  window.fromShow = [];
  window.addEventListener('message', (event) => {{
    const show = document.getElementById('show');
    if (show && event.source === show.contentWindow) {{
      window.fromShow.push({{ origin: event.origin, data: event.data }});
    }}
  }});
  window.sendTicket = (ticket, origin) =>
    document.getElementById('show').contentWindow.postMessage({{ type: 'fanout:ticket', ticket }}, origin);
</script>
<iframe id="other" srcdoc="<p>another frame of the host page</p>"></iframe>
<iframe id="show" src="{html.escape(frame_url)}" allow="camera; microphone; autoplay"
  width="1100" height="900"></iframe>
</body></html>"""


class HostApp:
    """The host app's site at http://localhost:<port>, another site than the gateway's 127.0.0.1, so
    the pages run cross-origin in its frames. A real server: Chromium does not let a page that
    Playwright fulfils (an unknown, hence public, address) frame a loopback one."""

    def __init__(self) -> None:
        pages: dict[str, bytes] = {}

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = pages.get(self.path)
                self.send_response(200 if body is not None else 404)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(body or b"")))
                self.end_headers()
                self.wfile.write(body or b"")

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._pages = pages
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.origin = f"http://localhost:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def embedding(self, frame_url: str) -> str:
        """The address of a new host page that embeds `frame_url`."""
        path = f"/embed-{len(self._pages)}"
        self._pages[path] = host_page(frame_url).encode()
        return f"{self.origin}{path}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


@pytest.fixture(scope="module")
def host_app() -> Iterator[HostApp]:
    host = HostApp()
    yield host
    host.close()


def open_host_page(host: HostApp, context: BrowserContext, problems: PageProblems, frame_url: str) -> Page:
    page = problems.watch(context.new_page())
    page.goto(host.embedding(frame_url))
    return page


def embedded(page: Page, system: RunningSystem, path: str) -> Frame:
    return eventually_on(
        page,
        lambda: next((f for f in page.frames if f.url.startswith(f"{system.base_url}{path}")), None),
        f"the {path} frame",
    )


def messages_from_show(page: Page) -> list[dict[str, Any]]:
    return list(page.evaluate("window.fromShow"))


def wait_until_frame_plays(frame: Frame) -> None:
    frame.wait_for_function("window.fanoutWatch && window.fanoutWatch.state === 'playing'", timeout=20_000)
    frame.wait_for_function(f"{VIDEO}.videoWidth > 0", timeout=10_000)
    start = frame.evaluate(f"{VIDEO}.currentTime")
    frame.wait_for_function(f"{VIDEO}.currentTime > {start} + 0.5", timeout=10_000)


@pytest.fixture(scope="module")
def broadcaster(
    ticket_system: RunningSystem, browser: Browser, host_app: HostApp
) -> Iterator[dict[str, Any]]:
    """The broadcast page, embedded by the host app with an expired publisher ticket: going live asks
    the host app for a new one, and goes live with it."""
    problems = PageProblems()
    context = browser.new_context()
    traffic = ApiTraffic(context)
    expired = ticket("publisher", "host-broadcaster", seconds=-3600)
    fresh = ticket("publisher", "host-broadcaster")
    page = open_host_page(host_app, context, problems, f"{ticket_system.base_url}/broadcast#ticket={expired}")
    frame = embedded(page, ticket_system, "/broadcast")
    frame.wait_for_function("window.fanoutBroadcast && window.fanoutBroadcast.hasTicket")
    show = page.frame_locator("#show")
    # The ticket replaces the key and names the room; it left the address at once.
    expect(show.locator("#publisher-key")).to_be_hidden()
    expect(show.locator("#room")).to_have_value(ROOM)
    expect(show.locator("#ticket-note")).to_contain_text(f"for room {ROOM}")
    assert "ticket" not in frame.evaluate("location.href")
    frame.wait_for_function("document.querySelector('#preview').videoWidth > 0")
    expect(show.locator("#go-live")).to_be_enabled()

    show.locator("#go-live").click()
    eventually_on(page, lambda: messages_from_show(page), "the page to ask for a new ticket")
    assert messages_from_show(page) == [
        {
            "origin": ticket_system.base_url,
            "data": {"type": "fanout:ticket-expired", "page": "broadcast", "code": "invalid_ticket"},
        }
    ]
    expect(show.locator("#ticket-note")).to_contain_text("waiting for a new one")
    page.evaluate("([ticket, origin]) => window.sendTicket(ticket, origin)", [fresh, ticket_system.base_url])
    frame.wait_for_function(
        "window.fanoutBroadcast.stages.length > 0"
        " && window.fanoutBroadcast.stages.every((s) => s.publishState === 'published')",
        timeout=20_000,
    )
    eventually_on(page, lambda: traffic.statuses("/publisher/status"), "a publisher status report")

    # Every publisher call carried the ticket, the expired one only on the first try.
    assert traffic.authorizations("/api/token/publisher-all") == [f"Bearer {expired}", f"Bearer {fresh}"]
    assert traffic.statuses("/api/token/publisher-all") == [401, 200]
    assert set(traffic.authorizations(f"/api/rooms/{ROOM}/publisher/events")) == {f"Bearer {fresh}"}
    assert set(traffic.authorizations(f"/api/rooms/{ROOM}/publisher/status")) == {f"Bearer {fresh}"}
    assert set(traffic.statuses(f"/api/rooms/{ROOM}/publisher/status")) == {204}
    yield {"tickets": [expired, fresh], "problems": problems}
    context.close()
    assert problems.errors == []


def test_a_viewer_with_a_ticket_in_the_fragment_plays(
    ticket_system: RunningSystem, browser: Browser, broadcaster: dict[str, Any]
) -> None:
    problems = PageProblems()
    context = browser.new_context()
    traffic = ApiTraffic(context)
    viewer_ticket = ticket("viewer", "viewer-dana")
    page = problems.watch(context.new_page())
    page.goto(f"{ticket_system.base_url}/watch#ticket={viewer_ticket}")
    wait_until_frame_plays(page.main_frame)

    # The ticket named the room and the viewer; it was sent in the header only, and left the address.
    assert page.evaluate("[window.fanoutWatch.room, window.fanoutWatch.userId]") == [ROOM, "viewer-dana"]
    assert traffic.authorizations("/api/token/viewer") == [f"Bearer {viewer_ticket}"]
    assert page.url == f"{ticket_system.base_url}/watch"
    assert all(viewer_ticket not in request.url for request in traffic.requests)
    stored = page.evaluate("JSON.stringify({...localStorage}) + JSON.stringify({...sessionStorage})")
    assert viewer_ticket not in stored and "viewer-dana" not in stored

    # Heartbeats go without a ticket (the gateway asks none there) and keep the lease.
    eventually_on(page, lambda: traffic.statuses("/api/viewer/heartbeat"), "a heartbeat", within=15)
    assert set(traffic.statuses("/api/viewer/heartbeat")) == {200}
    assert set(traffic.authorizations("/api/viewer/heartbeat")) == {None}
    expect(page.locator("#status")).to_have_attribute("data-state", "playing")
    context.close()
    assert problems.errors == []
    log = Path(ticket_system.log_path).read_text(errors="replace")
    for secret in [viewer_ticket, *broadcaster["tickets"]]:
        assert secret not in log and secret.rsplit(".", 1)[1] not in log


def test_without_a_ticket_the_page_says_one_is_required(
    ticket_system: RunningSystem, browser: Browser
) -> None:
    problems = PageProblems()
    context = browser.new_context()
    traffic = ApiTraffic(context)
    page = problems.watch(context.new_page())
    page.goto(f"{ticket_system.base_url}/watch?room={ROOM}")
    page.wait_for_function("window.fanoutWatch.state === 'ticket'")
    expect(page.locator("#error")).to_contain_text("A ticket is required to watch this show.")
    expect(page.locator("#error")).to_contain_text("Open this page from the host app")
    expect(page.locator("#video-overlay")).to_have_text("A ticket is needed")
    assert traffic.statuses("/api/token/viewer") == [401]  # asked once; no retry loop without a ticket
    context.close()
    assert problems.errors == []


def test_an_expired_ticket_asks_the_host_app_for_a_new_one(
    ticket_system: RunningSystem, browser: Browser, host_app: HostApp, broadcaster: dict[str, Any]
) -> None:
    problems = PageProblems()
    context = browser.new_context()
    traffic = ApiTraffic(context)
    expired = ticket("viewer", "viewer-erin", seconds=-3600)
    page = open_host_page(host_app, context, problems, f"{ticket_system.base_url}/watch#ticket={expired}")
    frame = embedded(page, ticket_system, "/watch")
    frame.wait_for_function("window.fanoutWatch && window.fanoutWatch.state === 'ticket'")
    expect(page.frame_locator("#show").locator("#error")).to_contain_text(
        "Your ticket has expired or is not valid. Asking the host app for a new one"
    )
    eventually_on(page, lambda: messages_from_show(page), "fanout:ticket-expired")
    assert messages_from_show(page) == [
        {
            "origin": ticket_system.base_url,
            "data": {"type": "fanout:ticket-expired", "page": "watch", "code": "invalid_ticket"},
        }
    ]

    # Only the parent may hand over a ticket: the host page's other frame posts one first, ignored.
    stranger = ticket("viewer", "viewer-mallory")
    fresh = ticket("viewer", "viewer-erin")
    page.evaluate(
        """([stranger, fresh, origin]) => {
            const other = document.getElementById('other').contentWindow;
            other.eval(`parent.document.getElementById('show').contentWindow.postMessage(
                { type: 'fanout:ticket', ticket: ${JSON.stringify(stranger)} }, '*')`);
            window.sendTicket(fresh, origin);
        }""",
        [stranger, fresh, ticket_system.base_url],
    )
    wait_until_frame_plays(frame)
    assert frame.evaluate("window.fanoutWatch.userId") == "viewer-erin"
    assert traffic.authorizations("/api/token/viewer") == [f"Bearer {expired}", f"Bearer {fresh}"]
    assert traffic.statuses("/api/token/viewer") == [401, 200]
    context.close()
    assert problems.errors == []
