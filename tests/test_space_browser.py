"""The Space in a real headless browser: Debian's chromium driven by Playwright opens the page on a worked example
(its result shown without pressing Run), uploads an image, types a prompt, presses Run and sees the heatmap, the
load chart, the answer and the coloured tokens; bad input shows a message.

Needs `/usr/bin/chromium` (`apt-get install -y chromium`); never `playwright install` (no download here)."""

from __future__ import annotations

from pathlib import Path

import pytest
import test_space

# The saved tiny model and the app served on a free port: test_space's module fixtures, shared.
model_dir, server = test_space.model_dir, test_space.server

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
TIMEOUT_MS = 60_000  # two shared cores: the first request also warms the model up

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium: apt-get install -y chromium"),
]


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def _open(browser, server):
    page = browser.new_page(viewport={"width": 1400, "height": 1500})
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(server)
    page.wait_for_selector("#run")
    return page


@pytest.fixture
def page(browser, server):
    """The page with its worked example shown (so no late example result can land on top of a test's own)."""
    page = _open(browser, server)
    page.wait_for_selector("#heatmap img")
    page.wait_for_function("document.querySelector('#answer textarea').value.length > 0")
    yield page
    page.close()


def _src(page, selector: str) -> str:
    return page.get_attribute(selector, "src") or ""


def _upload(page, path) -> None:
    """Choose `path` in the image input and wait until its preview replaced the one shown (the file reached the
    server)."""
    before = _src(page, "#image img")
    page.set_input_files("#image input[type=file]", str(path))
    page.wait_for_function(
        "before => { const img = document.querySelector('#image img'); return img && img.src !== before; }",
        arg=before,
    )


def test_page_opens_on_a_worked_example_without_run(browser, server):
    from space.shapes_examples import EXAMPLES

    page = _open(browser, server)  # no click anywhere: the result arrives with the page
    try:
        heatmap = page.wait_for_selector("#heatmap img")
        page.wait_for_selector("#load img")
        page.wait_for_function("document.querySelector('#answer textarea').value.length > 0")
        first_prompt = next(iter(EXAMPLES.values()))[2]
        assert page.input_value("#prompt textarea") == first_prompt  # the inputs show what was run
        assert page.query_selector("#image img") is not None
        page.wait_for_selector("#tokens >> text=Describe")  # the example's prompt tokens, coloured by expert
        size = heatmap.evaluate("img => [img.naturalWidth, img.naturalHeight]")
        assert size[0] > 600 and size[1] > 200
    finally:
        page.close()


def test_upload_prompt_run_shows_routing(page, tmp_path):
    example_heatmap = _src(page, "#heatmap img")
    _upload(page, test_space.SPACE_DIR / "examples" / "green_star.png")
    page.fill("#prompt textarea", "Name the star.")
    page.click("#run")

    page.wait_for_selector("#tokens >> text=star")  # this prompt's tokens, not the worked example's
    page.wait_for_function(
        "before => document.querySelector('#heatmap img').src !== before", arg=example_heatmap
    )
    heatmap = page.wait_for_selector("#heatmap img")
    page.wait_for_selector("#load img")
    page.wait_for_function("document.querySelector('#answer textarea').value.length > 0")
    size = heatmap.evaluate("img => [img.naturalWidth, img.naturalHeight]")
    assert size[0] > 600 and size[1] > 200  # a real rendered figure, not a placeholder
    assert page.input_value("#answer textarea").strip()
    assert (
        page.locator("#tokens").get_by_text("expert 0").count()
        + page.locator("#tokens").get_by_text("expert 1").count()
        > 0
    )  # the legend of the coloured tokens
    page.screenshot(path=str(tmp_path / "space.png"), full_page=True)
    assert (tmp_path / "space.png").stat().st_size > 10_000


@pytest.mark.parametrize(
    "case, message",
    [
        ("no image", "No image: upload one"),
        ("not an image", "Invalid file type: notes.txt"),  # the page refuses it before it reaches the server
        ("huge image", "images up to 40 MP are accepted"),
        ("empty prompt", "The prompt is empty"),
    ],
)
def test_bad_input_shows_a_message_not_a_trace(page, tmp_path, case, message):
    from PIL import Image

    if case == "no image":
        page.click("#image button[aria-label='Remove Image']")  # the worked example's image
        page.wait_for_selector("#image img", state="detached")
    elif case == "not an image":
        (tmp_path / "notes.txt").write_text("not an image")
        page.set_input_files("#image input[type=file]", str(tmp_path / "notes.txt"))
    elif case == "huge image":
        Image.new("L", (8000, 5100), 128).save(tmp_path / "huge.png")  # 40.8 MP, 50 kB of PNG
        _upload(page, tmp_path / "huge.png")  # the upload has reached the server before Run
    # "empty prompt": the worked example's image stays
    page.fill("#prompt textarea", "   " if case == "empty prompt" else "Describe the image.")
    page.click("#run")
    assert page.wait_for_selector(f"text={message}").is_visible()
    page.screenshot(path=str(tmp_path / "space_error.png"), full_page=True)
    assert "Traceback" not in page.content()
