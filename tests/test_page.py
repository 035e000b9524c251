"""The chat page at ``GET /``, in a real headless Chromium driven by Selenium, against a real ``streamllm serve``
process with the real default model (the shared ``server`` fixture: cache 4 + 60, replies of at most 64 tokens).

Chromium and its driver come from Debian's packages (``make browser``); without them these tests are skipped."""

import os
import shutil
import time
from pathlib import Path

import httpx
import pytest
from server_helpers import KEY_B

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and DRIVER),
    reason="Chromium is not installed (make browser installs it from Debian's packages)",
)
ARTIFACTS = Path(
    os.environ.get("STREAMLLM_TEST_ARTIFACTS", Path(__file__).parent.parent / "build" / "test-artifacts")
)
WAIT = 120  # seconds: a reply of 64 tokens on one thread, with room to spare on a busy machine


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    profile = tmp_path_factory.mktemp("chromium-profile")
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--window-size=1200,900",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield driver
    driver.quit()


class Page:
    """The chat page as a user works it: by keyboard, reading what is on the screen."""

    def __init__(self, driver, url: str):
        self.driver, self.url = driver, url

    def open(self, key: str | None = KEY_B) -> None:
        self.driver.get(self.url + "/")
        self.until(lambda: self.js("return document.getElementById('model').textContent") != "", "the page")
        if key is not None:
            self.set_key(key)

    def js(self, script: str, *args):
        return self.driver.execute_script(script, *args)

    def el(self, element_id: str):
        from selenium.webdriver.common.by import By

        return self.driver.find_element(By.ID, element_id)

    def until(self, check, what: str, timeout: float = WAIT):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            value = check()
            if value:
                return value
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}; error shown: {self.el('error').text!r}")

    def set_key(self, key: str) -> None:
        field = self.el("key")
        field.clear()
        field.send_keys(key)
        self.js("document.getElementById('key').dispatchEvent(new Event('change'))")

    def type(self, text: str) -> None:
        from selenium.webdriver.common.keys import Keys

        box = self.el("input")
        box.send_keys(text)
        box.send_keys(Keys.ENTER)

    def replies(self) -> list[str]:
        return self.js(
            "return [...document.querySelectorAll('#messages li.assistant')].map(li => li.textContent)"
        )

    def streaming(self) -> bool:
        return self.js("return document.querySelector('#messages li.streaming') !== null")

    def ask(self, text: str) -> str:
        """Send a message and wait for the whole reply; returns it."""
        before = len(self.replies())
        self.type(text)
        self.until(lambda: len(self.replies()) == before + 1, "the reply to start")
        self.until(lambda: not self.streaming(), "the reply to end")
        return self.replies()[-1]

    def bar(self) -> tuple[int, int, str]:
        bar = self.el("cache-bar")
        return (
            int(bar.get_attribute("aria-valuenow")),
            int(bar.get_attribute("aria-valuemax")),
            bar.get_attribute("data-full"),
        )

    def session_id(self) -> str:
        return self.js("return localStorage.getItem('streamllm.current')")

    def screenshot(self, name: str) -> Path:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / name
        self.driver.save_screenshot(str(path))
        return path


@pytest.fixture
def page(browser, server):
    page = Page(browser, server.url)
    page.open()
    page.el("new-session").click()
    return page


def _session(server, session_id: str) -> dict:
    response = httpx.get(
        f"{server.url}/v1/sessions/{session_id}", headers={"Authorization": f"Bearer {KEY_B}"}, timeout=30
    )
    response.raise_for_status()
    return response.json()


def test_a_reply_streams_in_and_the_cache_bar_fills_and_stays_full(page, server):
    page.type("Tell me about the ocean.")
    seen_partial = page.until(
        lambda: page.streaming() and len(page.replies()[-1]) > 0 and page.replies()[-1], "a partial reply"
    )
    page.until(lambda: not page.streaming(), "the reply to end")
    whole = page.replies()[-1]
    assert whole.startswith(seen_partial) and len(whole) > len(seen_partial)
    assert page.el("stat-ttft").text.endswith("ms") and float(page.el("stat-rate").text) > 0

    fills = []
    for question in ("What lives in it?", "Why is it salty?", "How deep is it?", "Name a famous ship."):
        page.ask(question)
        page.until(lambda: page.bar()[0] > 0, "the cache bar")
        fills.append(page.bar())
    size = fills[-1][1]
    assert size == 64
    full_from = next(i for i, (held, _, _) in enumerate(fills) if held == size)
    assert all(held == size and full == "true" for held, _, full in fills[full_from:]), fills
    info = _session(server, page.session_id())
    assert info["turns"] == 5 and info["cache_length"] == size and info["evicted"] > 0
    assert page.el("stat-evicted").text == f"{info['evicted']:,}"
    page.screenshot("chat-page.png")


def test_a_reload_shows_the_conversation_and_it_continues(page, server):
    first = page.ask("What is the capital of France?")
    session_id = page.session_id()
    page.driver.refresh()
    page.until(lambda: page.replies(), "the conversation after the reload")
    assert page.replies() == [first] and page.session_id() == session_id
    page.el("key").clear()  # the key was not remembered, so the page asks for it again
    page.set_key(KEY_B)
    page.ask("And of Italy?")
    assert _session(server, session_id)["turns"] == 2
    assert len(page.replies()) == 2


def test_keyboard_alone_shift_enter_is_a_new_line_and_stop_undoes_the_turn(page, server):
    from selenium.webdriver.common.keys import Keys

    page.ask("Hello!")
    session_id = page.session_id()
    box = page.el("input")
    box.send_keys("Write a long story about a dragon.")
    box.send_keys(Keys.SHIFT, Keys.ENTER)
    box.send_keys("Make it sad.")
    assert page.js("return document.getElementById('input').value") == (
        "Write a long story about a dragon.\nMake it sad."
    )
    assert len(page.replies()) == 1  # Shift+Enter sent nothing
    box.send_keys(Keys.ENTER)
    page.until(lambda: page.streaming() and len(page.replies()[-1]) > 5, "the reply to start")
    box.send_keys(Keys.ESCAPE)
    page.until(lambda: page.el("notice").is_displayed(), "the stop notice")
    assert "undid" in page.el("notice").text
    assert page.js("return document.getElementById('input').value").startswith("Write a long story")
    assert len(page.replies()) == 1
    page.until(lambda: not _session(server, session_id)["busy"], "the server to undo the turn", 30)
    assert _session(server, session_id)["turns"] == 1


def test_a_wrong_key_shows_an_error_in_plain_words(page):
    page.set_key("not-the-key")
    page.until(lambda: page.el("error").is_displayed(), "the error")
    assert "API key" in page.el("error").text
    page.set_key(KEY_B)
    page.until(lambda: not page.el("error").is_displayed(), "the error to go")


def test_markup_from_the_model_is_shown_as_text(page):
    page.js("document.querySelector('#settings summary').click()")
    page.el("temperature").clear()
    page.el("temperature").send_keys("0")
    reply = page.ask("Show me a minimal HTML page with a script tag that calls alert.")
    assert "<script>" in reply
    assert page.js("return document.querySelectorAll('#messages script').length") == 0
    scripts = page.js("return [...document.querySelectorAll('script')].map(s => new URL(s.src).pathname)")
    assert scripts == ["/ui/recalls.js", "/ui/app.js"]  # the page's own
    # The reply is also drawn again from this browser's storage after a reload: still text.
    page.driver.refresh()
    page.until(lambda: page.replies(), "the conversation after the reload")
    assert "<script>" in page.replies()[-1]
    assert page.js("return document.querySelectorAll('#messages script').length") == 0


def test_sessions_can_be_switched_and_deleted(page, server):
    page.ask("Remember the word pelican.")
    first = page.session_id()
    page.el("new-session").click()
    assert page.replies() == []
    page.ask("Remember the word walrus.")
    second = page.session_id()
    assert second != first
    titles = page.js("return [...document.querySelectorAll('#sessions li .open')].map(b => b.textContent)")
    assert any("pelican" in t for t in titles) and any("walrus" in t for t in titles)
    page.js(
        "[...document.querySelectorAll('#sessions li')].find(li => li.textContent.includes('pelican'))"
        ".querySelector('.open').click()"
    )
    page.until(lambda: page.session_id() == first, "the first session to open")
    page.js(
        "[...document.querySelectorAll('#sessions li')].find(li => li.textContent.includes('walrus'))"
        ".querySelector('.delete').click()"
    )
    page.until(
        lambda: (
            httpx.get(
                f"{server.url}/v1/sessions/{second}", headers={"Authorization": f"Bearer {KEY_B}"}
            ).status_code
            == 404
        ),
        "the session to be deleted",
        30,
    )
    assert page.session_id() == first


def test_readable_at_phone_width(page, browser):
    page.ask("Hi!")
    browser.set_window_size(390, 844)
    try:
        assert page.js("return document.documentElement.scrollWidth <= window.innerWidth + 1")
        assert page.el("input").is_displayed() and page.el("cache-bar").is_displayed()
        page.screenshot("chat-page-phone.png")
    finally:
        browser.set_window_size(1200, 900)


def test_the_page_is_served_with_a_strict_content_security_policy(server):
    response = httpx.get(f"{server.url}/", timeout=30)
    assert response.status_code == 200 and "text/html" in response.headers["content-type"]
    policy = response.headers["content-security-policy"]
    assert (
        "script-src 'self'" in policy and "default-src 'none'" in policy and "'unsafe-inline'" not in policy
    )
    assert '<script src="/ui/app.js"' in response.text and "<script>" not in response.text
    assert httpx.get(f"{server.url}/ui/app.js?name=../persist.py", timeout=30).text.startswith(
        "// The streamllm"
    )


# A memory session on the tiny random model, served in this process: a cache of 4 + 60 and blocks of 16 evict and
# recall blocks within four short turns. Markup in the messages must reach the page as text, recalled or not.
MEMORY_MESSAGES = [
    "The keeper <b>Orla</b> painted the tower red and white every spring, before the storms came in.",
    "Her brother <img src=x onerror=alert(1)> Tomas kept bees on the cliff and sold honey on Saturdays.",
    "A ship called the <i>Marigold</i> ran aground on the northern rocks in the winter of the great fog.",
    "Which of them kept bees, and where did they sell the honey?",
]


@pytest.fixture(scope="module")
def memory_server(tiny, one_torch_thread):
    from server_helpers import ThreadServer

    from streamllm import StreamConfig
    from streamllm.config import MemoryConfig
    from streamllm.server import ServerConfig, create_app

    model, tokenizer = tiny
    stream = StreamConfig(num_sinks=4, window=60, chunk_size=16, memory=MemoryConfig(block_size=16, blocks=2))
    config = ServerConfig(model_id="tiny", stream=stream, max_tokens_limit=64)
    with ThreadServer(create_app(model, tokenizer, config)) as server:
        yield server


def test_what_a_reply_recalled_is_folded_under_it(browser, memory_server):
    page = Page(browser, memory_server.url)
    page.open(key=None)
    page.js("document.querySelector('#settings summary').click()")
    for field, value in (("temperature", "0"), ("max-tokens", "3")):
        page.el(field).clear()
        page.el(field).send_keys(value)
    for message in MEMORY_MESSAGES:
        page.ask(message)
    recalls = httpx.get(f"{memory_server.url}/v1/sessions/{page.session_id()}", timeout=30).json()["memory"]
    recalls = recalls["last_recalls"]
    assert recalls and page.el("memory-stat").is_displayed() and "blocks" in page.el("stat-memory").text

    def last_section() -> dict:
        return page.js(
            "const li = [...document.querySelectorAll('#messages li.assistant')].pop().nextElementSibling;"
            "const d = li && li.classList.contains('recalls') && li.querySelector('details');"
            "return d && {open: d.open, summary: d.querySelector('summary').textContent,"
            " ago: [...d.querySelectorAll('.ago')].map(e => e.textContent),"
            " text: [...d.querySelectorAll('q')].map(e => e.textContent)}"
        )

    shown = page.until(last_section, "the recall section under the last reply", 10)
    assert not shown["open"] and shown["summary"] == f"Recalled from memory: {len(recalls)} blocks"
    assert shown["text"] == [r["text"] for r in recalls]
    assert shown["ago"] == [f"said {r['tokens_ago']:,} tokens ago" for r in recalls]
    # the messages' markup (the block holding the answer starts inside "<img src=x onerror=...>"), shown as text
    assert any(c in text for text in shown["text"] for c in "<>"), shown["text"]
    assert page.js("return document.querySelectorAll('#messages b, #messages i, #messages img').length") == 0
    page.screenshot("memory-recalls-folded.png")
    page.js("document.querySelector('#messages li.recalls:last-child summary').click()")
    assert page.js("return document.querySelector('#messages li.recalls:last-child details').open")
    assert page.el("messages").find_element("css selector", "li.recalls:last-child q").is_displayed()
    page.until(  # opening it scrolled it into view
        lambda: page.js(
            "const box = document.getElementById('messages').getBoundingClientRect();"
            "const li = document.querySelector('#messages li.recalls:last-child').getBoundingClientRect();"
            "return li.bottom <= box.bottom + 1 && li.top >= box.top"
        ),
        "the opened list to scroll into view",
        10,
    )
    page.screenshot("memory-recalls-open.png")
    page.driver.refresh()  # drawn again from this browser's storage, still folded and still text
    page.until(lambda: len(page.replies()) == len(MEMORY_MESSAGES), "the conversation after the reload")
    assert last_section() == shown
    assert page.js("return document.querySelectorAll('#messages b, #messages i, #messages img').length") == 0
