"""The pages in AWS mode: the real amazon-ivs-web-broadcast bundle with the system's own tokens.

The system runs as in AWS mode (FANOUT_MODE=aws, a region, a signing key from a file, credentials
from the environment) with its IVS endpoint pointed at the emulator, which `tools.run_local` always
does; so /api/config says "aws", the pages load the vendored SDK instead of local-stage.js, and every
token is a real self-signed one whose events_url names the emulator's events socket.

What the real SDK does with a token (ivs-facts §1.1, §5): it decodes the JWT's claims on the client
(a bad token throws TOKEN_MALFORMED from the Stage constructor, an expired one fails join() with
TOKEN_EXPIRED), then opens a WebSocket to `<events_url>?...&topic=<topic>/publishers` offering the
token as its subprotocol. The emulator speaks its own signalling, not the SDK's, so that socket never
opens and join() fails: the pages must show that as a problem and go on, never throw.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from playwright.sync_api import Browser, BrowserContext, Page, Request, WebSocket, expect

from tests.e2e.conftest import BROWSER_FAN_OUT, RunningSystem, screenshot, start_system
from tests.e2e.pages import eventually, eventually_on, navigate_away, token_claims

pytestmark = pytest.mark.e2e

STAGES = 2
VENDOR_BUNDLE = "/static/vendor/amazon-ivs-web-broadcast.js"
LOCAL_STAGE = "/static/js/local-stage.js"
# The SDK's answers to a token it could not use; none may appear for the system's tokens.
TOKEN_ERRORS = ("TOKEN_MALFORMED", "TOKEN_EXPIRED", "TOKEN_NOT_ALLOWED")
# The SDK reports analytics to, and reads its device configuration from, AWS hosts; the test stays on
# this machine (the SDK carries on without them).
AWS_HOSTS = re.compile(r"^https://[^/]*\.live-video\.net/")
# The SDK retries a socket that will not open for about 45 s before join() fails (ivs-facts §6.6).
# Its own override (the bundle's IVS_CLIENT_OVERRIDES hook) makes it give up after the first attempt,
# so the join error the pages must handle arrives in seconds; nothing else about the SDK changes.
NO_SOCKET_RETRIES = "window.IVS_CLIENT_OVERRIDES = { socketConnectMaxRetries: 0 };"


@pytest.fixture(scope="module")
def aws_system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningSystem]:
    state_dir = tmp_path_factory.mktemp("aws-mode")
    # AWS mode never creates a signing key: the operator provides one (a Secret in Kubernetes).
    key_file = state_dir / "signing-key.pem"
    key_file.write_bytes(
        ec.generate_private_key(ec.SECP384R1()).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    key_file.chmod(0o600)
    with start_system(
        state_dir,
        FANOUT_MODE="aws",
        AWS_REGION="us-east-1",
        AWS_ACCESS_KEY_ID="local",
        AWS_SECRET_ACCESS_KEY="local",
        AWS_EC2_METADATA_DISABLED="true",
        FANOUT_SIGNING_KEY_FILE=str(key_file),
        FANOUT_MIN_STAGES=str(STAGES),
        **BROWSER_FAN_OUT,
    ) as system:
        yield system


@dataclass
class SdkTraffic:
    """What the page asked for: scripts, events sockets (URL and offered subprotocol), page errors."""

    scripts: list[str] = field(default_factory=list)
    sockets: list[str] = field(default_factory=list)
    subprotocols: dict[str, str] = field(default_factory=dict)  # socket URL -> Sec-WebSocket-Protocol
    _socket_urls: dict[str, str] = field(default_factory=dict)  # DevTools request id -> socket URL
    page_errors: list[str] = field(default_factory=list)

    def watch(self, context: BrowserContext, page: Page) -> Page:
        page.on("request", self._request)
        page.on("websocket", self._websocket)
        page.on("pageerror", lambda error: self.page_errors.append(str(error)))
        # Playwright's WebSocket has no request headers; the DevTools protocol sees the handshake.
        cdp = context.new_cdp_session(page)
        cdp.on("Network.webSocketCreated", self._created)
        cdp.on("Network.webSocketWillSendHandshakeRequest", self._handshake)
        cdp.send("Network.enable")
        return page

    def _request(self, request: Request) -> None:
        if request.resource_type == "script":
            self.scripts.append(urlsplit(request.url).path)

    def _websocket(self, socket: WebSocket) -> None:
        self.sockets.append(socket.url)

    def _created(self, params: dict[str, Any]) -> None:
        self._socket_urls[params["requestId"]] = params["url"]

    def _handshake(self, params: dict[str, Any]) -> None:
        headers = {k.lower(): v for k, v in params["request"]["headers"].items()}
        url = self._socket_urls.get(params["requestId"], "")
        self.subprotocols[url] = headers.get("sec-websocket-protocol", "")

    def sockets_for(self, token: str) -> list[str]:
        """The sockets the SDK opened with this token: to its events_url, for its topic."""
        claims = token_claims(token)
        found = [url for url in self.sockets if self.subprotocols.get(url) == token]
        for url in found:
            base, _, query = url.partition("?")
            assert base == claims["events_url"], url
            assert parse_qs(query).get("topic") == [f"{claims['topic']}/publishers"], url
        return found


def new_context(browser: Browser) -> BrowserContext:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.add_init_script(NO_SOCKET_RETRIES)
    context.route(AWS_HOSTS, lambda route: route.abort())
    return context


def assert_real_sdk_loaded(page: Page, traffic: SdkTraffic) -> None:
    assert page.evaluate("typeof window.IVSBroadcastClient.Stage") == "function"
    assert re.fullmatch(r"\d+\.\d+\.\d+", page.evaluate("window.IVSBroadcastClient.__version"))
    assert VENDOR_BUNDLE in traffic.scripts and LOCAL_STAGE not in traffic.scripts, traffic.scripts


def test_broadcast_page_in_aws_mode_uses_the_sdk_with_the_systems_tokens(
    aws_system: RunningSystem, browser: Browser
) -> None:
    assert aws_system.api("GET", "/api/config")[1]["mode"] == "aws"
    context = new_context(browser)
    traffic = SdkTraffic()
    page = traffic.watch(context, context.new_page())
    page.goto(f"{aws_system.base_url}/broadcast")
    page.wait_for_function("window.fanoutBroadcast.state === 'idle'")
    assert page.evaluate("window.fanoutBroadcast.mode") == "aws"
    assert_real_sdk_loaded(page, traffic)
    expect(page.locator("#mode-note")).to_be_hidden()  # the local-mode note is for local mode only
    page.wait_for_function("document.querySelector('#preview').videoWidth > 0")
    page.fill("#publisher-key", aws_system.publisher_key)

    with page.expect_response("**/api/token/publisher-all") as answer:
        page.click("#go-live")
    tokens = answer.value.json()["tokens"]
    assert len(tokens) == STAGES

    # Each Stage's join fails (the emulator does not speak the SDK's signalling), and the page says
    # so per Stage; the SDK took the tokens: no token error, and a socket to each token's events_url.
    page.wait_for_function(
        f"window.fanoutBroadcast.stages.length === {STAGES}"
        " && window.fanoutBroadcast.stages.every((s) => s.publishState === 'errored')",
        timeout=30_000,
    )
    stages = {s["stageArn"]: s for s in page.evaluate("window.fanoutBroadcast.stages")}
    assert stages.keys() == {t["stageArn"] for t in tokens}
    error = page.locator("#error")
    for token in tokens:
        problem = stages[token["stageArn"]]["problem"]
        assert problem.startswith("join failed: ") and not any(e in problem for e in TOKEN_ERRORS), problem
        expect(error).to_contain_text(f"Stage {token['stageArn'].rsplit('/', 1)[1]}: join failed: ")
        eventually_on(
            page,
            lambda token=token: traffic.sockets_for(token["token"]),
            "a socket to the token's events_url",
        )
    expect(page.locator("#status")).to_contain_text(f"publishing to 0 of {STAGES} Stage(s)")
    expect(page.locator("#stages-body td.local.problem")).to_have_count(STAGES)
    screenshot(page, "broadcast-aws-mode-join-failed")

    page.click("#stop")
    page.wait_for_function(
        "window.fanoutBroadcast.state === 'idle' && window.fanoutBroadcast.stages.length === 0"
    )
    expect(error).to_be_hidden()
    expect(page.locator("#go-live")).to_be_enabled()
    context.close()
    assert traffic.page_errors == []


def test_watch_page_in_aws_mode_uses_the_sdk_and_retries_with_a_new_token(
    aws_system: RunningSystem, browser: Browser
) -> None:
    status, _ = aws_system.api("POST", "/api/token/publisher-all", {}, key=aws_system.publisher_key)
    assert status == 200  # the room and its Stages exist; nobody publishes
    context = new_context(browser)
    traffic = SdkTraffic()
    page = traffic.watch(context, context.new_page())
    with page.expect_response("**/api/token/viewer") as answer:
        page.goto(f"{aws_system.base_url}/watch")
    first = answer.value.json()
    assert answer.value.status == 200 and first["token"], first
    page.wait_for_function("window.fanoutWatch.mode === 'aws'")
    assert_real_sdk_loaded(page, traffic)

    # The join fails without a token error; the page says it is reconnecting and asks for a new token.
    with page.expect_response("**/api/token/viewer", timeout=30_000) as again:
        page.wait_for_function("window.fanoutWatch.state === 'reconnecting'", timeout=20_000)
        message = page.evaluate("window.fanoutWatch.message")
        assert message and not any(e in message for e in TOKEN_ERRORS), message
        expect(page.locator("#status")).to_have_attribute("data-state", "reconnecting")
        expect(page.locator("#video-overlay")).to_have_text("Reconnecting…")
        screenshot(page, "watch-aws-mode-reconnecting")
    second = again.value.json()
    assert second["participantId"] != first["participantId"]
    eventually_on(
        page, lambda: traffic.sockets_for(first["token"]), "a socket to the first token's events_url"
    )
    eventually_on(
        page, lambda: traffic.sockets_for(second["token"]), "a socket to the new token's events_url"
    )

    navigate_away(page)  # the leave beacon ends the lease
    eventually(lambda: aws_system.api("GET", "/api/rooms/main")[1]["viewers"] == 0, "the viewer gone")
    context.close()
    assert traffic.page_errors == []
