"""The web page in a real browser: Debian's chromium, headless, driven by Selenium through
Debian's chromium-driver (``.ci/run`` installs both with apt-get when absent). It loads the page
from the service on 127.0.0.1, uploads a Flickr8k photo, waits for its caption, hovers a word and
checks that its attention overlay is drawn; a text file is rejected with the server's message;
the API docs at /docs render with no network.
The screenshot is kept in test-artifacts/serve_page.png."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import pytest
import uvicorn

from caption_support import save_tiny_checkpoint
from sca_caption.captioning import ImageCaptioner
from sca_caption.serve.app import ServiceLimits, create_app
from sca_caption.serve.model_card import ModelCard

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[test]')")
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts"
PHOTO = "flickr8k/Flicker8k_Dataset/240583223_e26e17ee96.jpg"
CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
CHROMIUM_FLAGS = (
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,1000",
    "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-default-apps", "--disable-extensions", "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
)
OVERLAY_PIXELS = "const c = arguments[0]; return c.getContext('2d').getImageData(0, 0, c.width, c.height).data.filter((v, i) => i % 4 === 3 && v > 0).length;"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None,
                       reason="Debian's chromium and chromium-driver are not installed (.ci/run installs them with apt-get)"),
]


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    """The service on a free 127.0.0.1 port, in a thread of this process (seed 1: random weights
    that give the photo a caption of several words, not an empty one)."""
    checkpoint = save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pt", seed=1)
    captioner = ImageCaptioner.from_checkpoint(checkpoint)
    app = create_app(captioner, card=ModelCard("tiny.pt"), limits=ServiceLimits(max_wait_ms=0))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    server.should_exit = True
    thread.join(timeout=30)


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    yield driver
    driver.quit()


def test_upload_a_photo_see_its_caption_and_a_words_attention(shared_data, tmp_path, service, browser):
    browser.get(f"{service}/")
    wait = WebDriverWait(browser, 60)
    wait.until(expected_conditions.text_to_be_present_in_element((By.ID, "model"), "efficientnet_lite0"))
    browser.find_element(By.ID, "files").send_keys(str(shared_data / PHOTO))
    words = wait.until(expected_conditions.presence_of_all_elements_located((By.CSS_SELECTOR, ".card .word")))
    card = browser.find_element(By.CSS_SELECTOR, ".card")
    assert len(words) > 1
    assert card.find_element(By.CSS_SELECTOR, ".name").text == Path(PHOTO).name
    assert len(card.find_elements(By.CSS_SELECTOR, ".nbest li")) == 3
    canvases = card.find_elements(By.CSS_SELECTOR, ".frame canvas")
    assert [c.get_attribute("data-layer") for c in canvases] == ["stage6", "stage7"]
    assert all("shown" not in c.get_attribute("class") for c in canvases)

    ActionChains(browser).move_to_element(words[0]).perform()
    wait.until(lambda _: all("shown" in c.get_attribute("class") for c in canvases))
    assert all(browser.execute_script(OVERLAY_PIXELS, c) > 0 for c in canvases)
    assert "top channels" in card.find_element(By.CSS_SELECTOR, ".channels").text
    time.sleep(0.3)  # the overlay's fade-in
    ARTIFACTS.mkdir(exist_ok=True)
    assert browser.save_screenshot(str(ARTIFACTS / "serve_page.png"))

    notes = tmp_path / "notes.jpg"
    notes.write_text("not a photo\n")
    browser.find_element(By.ID, "files").send_keys(str(notes))
    rejected = wait.until(expected_conditions.presence_of_element_located((By.CSS_SELECTOR, ".card.rejected .error")))
    assert rejected.text == "Rejected: notes.jpg: not an image file Pillow can read"


def test_the_api_docs_render_their_operations_with_no_network(service, browser):
    """``/docs`` is Swagger UI from the packaged copy: the browser resolves no host but 127.0.0.1."""
    browser.get(f"{service}/docs")
    paths = WebDriverWait(browser, 60).until(
        expected_conditions.presence_of_all_elements_located((By.CSS_SELECTOR, ".opblock .opblock-summary-path"))
    )
    assert {p.text.replace("\u200b", "") for p in paths} == {"/v1/captions", "/v1/model", "/healthz"}
    assert all(not src.startswith("http") or src.startswith(service)
               for src in browser.execute_script("return [...document.scripts].map(s => s.src)"))
