"""The web demo (`segllm-edge web`): its API against a real uvicorn server, and the page in a real browser
(Debian's chromium driven by Selenium through chromium-driver). The model is the shared golden export on
onnxruntime; only the browser test runs rounds (two)."""
from __future__ import annotations

import io
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from segllm_edge.drawing import FILL_ALPHA, Mark, legend_image, outline, round_color, round_layer, tag_positions  # noqa: E402
from segllm_edge.web.cli import bind  # noqa: E402
from segllm_edge.web.conversations import ConversationStore, LocalEngine, RemoteEngine, decode_upload  # noqa: E402
from web_helpers import ROUND_TIMEOUT_S, ask, call, live_server  # noqa: E402


# ------------------------------------------------------------------------------------------- drawing
def test_round_layer_draws_fill_outline_box_and_number():
    h, w = 120, 160
    mask = np.zeros((h, w), bool)
    mask[40:80, 50:110] = True
    layer = round_layer(Mark(3, mask, np.array([50, 40, 110, 80], np.float32)), (h, w))
    assert layer.shape == (h, w, 4) and layer.dtype == np.uint8
    color = round_color(3)
    assert tuple(layer[60, 80, :3]) == color and layer[60, 80, 3] == round(FILL_ALPHA * 255)   # tinted inside
    assert layer[40, 80, 3] == 255 and layer[79, 80, 3] == 255                                # opaque outline
    assert layer[60, 20, 3] == 0 and layer[10, 150, 3] == 0                                   # nothing outside
    band = outline(mask, 2)
    assert band[40, 80] and band[41, 80] and not band[42, 80] and not band[60, 80]
    tag = tag_positions([Mark(3, mask, np.array([50, 40, 110, 80]))], (h, w))[3]
    assert tag == (50, 40)
    x, y = tag
    assert (layer[y:y + 20, x:x + 20, :3] > 200).all(axis=-1).any()                           # white digit on the tag


def test_tags_of_rounds_with_the_same_box_do_not_cover_each_other_and_legend_lists_rounds():
    h, w = 100, 200
    mask = np.zeros((h, w), bool)
    mask[20:60, 30:90] = True
    box = np.array([30, 20, 90, 60], np.float32)
    marks = [Mark(1, mask, box, "the red circle"), Mark(2, mask, box, "next to it", (1,)),
             Mark(3, np.zeros((h, w), bool), None, "nothing")]
    tags = tag_positions(marks, (h, w))
    assert set(tags) == {1, 2} and tags[1] == (30, 20) and tags[2][0] > 30
    rgb = np.full((h, w, 3), 200, np.uint8)
    leg = legend_image(rgb, marks)
    assert leg.shape[1] == 360 and leg.shape[0] > h + 3 * 10   # widened to fit, one legend line per round
    for k in (1, 2):
        assert any((leg[h:, :40] == round_color(k)).all(axis=-1).ravel()), f"no swatch of round {k}"


def test_round_result_overlay_uses_the_shared_drawing():
    from segllm_edge.runtime.results import RoundResult

    h, w = 60, 80
    mask = np.zeros((h, w), bool)
    mask[10:40, 20:60] = True
    r = RoundResult(round=1, question="q", refs=(), mask=mask, box=np.array([20, 10, 60, 40], np.float32),
                    model_mask=np.ones((4, 4), bool), model_box=np.zeros(4, np.float32),
                    mask_logits=np.zeros((2, 2), np.float32), score=1.0, query_index=0)
    rgb = np.zeros((h, w, 3), np.uint8)
    out = r.overlay(rgb)
    assert tuple(out[10, 40]) == round_color(1)      # outline drawn opaque in the round's colour
    assert 0 < out[25, 40, 0] < round_color(1)[0]    # inside: blended


def test_web_demo_does_not_import_torch():
    """The demo on an export runs in a torch-free environment: the web modules and the drawing never import torch."""
    import subprocess
    import sys

    code = ("import sys, segllm_edge.web.app as a, segllm_edge.web.cli, segllm_edge.drawing\n"
            "from segllm_edge.web.conversations import ConversationStore, LocalEngine\n"
            "class E:\n    def describe(self): return 'x'\n"
            "a.create_app(ConversationStore(E()))\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


# ------------------------------------------------------------------------------------------- server
@pytest.fixture(scope="module")
def web_model(golden_export):
    import segllm_edge

    return segllm_edge.load(golden_export, backend="onnxruntime")


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def test_api_errors_caps_expiry_and_separate_conversations(web_model, golden_image, tmp_path):
    clock = Clock()
    store = ConversationStore(LocalEngine(web_model), max_conversations=2, idle_timeout=60, clock=clock)
    with live_server(store) as base:
        st, info = call(f"{base}/api/info")
        assert st == 200 and info["max_conversations"] == 2 and "llm_prefill" in info["stages"]
        st, page = call(base + "/")
        assert st == 200 and b'id="file-input"' in page

        st, err = call(f"{base}/api/conversations", "POST", b"not an image at all", {"X-Filename": "notes.txt"})
        assert st == 400 and err["kind"] == "ImageError" and "'notes.txt' is not an image" in err["error"]
        st, err = call(f"{base}/api/conversations", "POST", b"")
        assert st == 400 and "is empty" in err["error"]
        from segllm_edge.limits import MAX_IMAGE_BYTES

        import http.client
        from urllib.parse import urlsplit

        conn = http.client.HTTPConnection(urlsplit(base).netloc, timeout=30)  # refused on its declared size,
        conn.putrequest("POST", "/api/conversations")                        # before any body is read
        conn.putheader("Content-Length", str(MAX_IMAGE_BYTES + 1))
        conn.putheader("X-Filename", "huge.raw")
        conn.endheaders()
        res = conn.getresponse()
        err = json.loads(res.read())
        conn.close()
        assert res.status == 400 and err["kind"] == "ImageError"
        assert f"'huge.raw' is {MAX_IMAGE_BYTES + 1} bytes, over the limit of {MAX_IMAGE_BYTES} bytes" in err["error"]
        assert info["max_upload_bytes"] == MAX_IMAGE_BYTES

        png = golden_image.read_bytes()
        st, a = call(f"{base}/api/conversations", "POST", png, {"X-Filename": "shapes_a.png"})
        assert st == 201 and (a["width"], a["height"]) == (640, 480) and a["rounds"] == []
        st, b = call(f"{base}/api/conversations?bundled=1", "POST")
        assert st == 201 and b["id"] != a["id"]
        st, img = call(base + b["image"])
        assert st == 200 and Image.open(io.BytesIO(img)).size == (b["width"], b["height"])

        # each user's conversation is its own: nothing to refer to yet in either
        for cid in (a["id"], b["id"]):
            st, err = ask(base, cid, "Segment it.[REF:1]")
            assert st == 400 and err["kind"] == "RoundReferenceError" and "no round has been answered" in err["error"]
        st, err = ask(base, a["id"], "Segment the <seg> here.")
        assert st == 400 and err["kind"] == "QuestionError" and "reserved token" in err["error"]
        st, err = ask(base, a["id"], "x" * 3000)
        assert st == 400 and "over this demo's limit" in err["error"]
        st, err = ask(base, a["id"], "   ")
        assert st == 400 and "type a question" in err["error"]

        # the cap: a third browser user is told why, and no traceback reaches anyone
        st, err = call(f"{base}/api/conversations", "POST", png)
        assert st == 503 and err["kind"] == "CapacityError" and "--max-conversations 2" in err["error"]
        st, err = call(f"{base}/api/conversations/not-a-conversation")
        assert st == 404 and "start a new conversation" in err["error"]

        # idle expiry frees the slots; the ended conversation says so
        clock.t += 61
        st, err = ask(base, a["id"], "Segment the red circle.")
        assert st == 404 and "idle for more than 1 min" in err["error"]
        assert len(store) == 0
        st, c = call(f"{base}/api/conversations", "POST", png)
        assert st == 201
        st, out = call(f"{base}/api/conversations/{c['id']}", "DELETE")
        assert st == 200 and out["closed"] and len(store) == 0


def test_context_budget_and_unreachable_server_are_page_errors(web_model, golden_image):
    """A conversation that cannot fit its first round (context full) and a Triton server that is gone: both
    come back as JSON errors the page shows."""
    png = golden_image.read_bytes()
    tiny_budget = ConversationStore(LocalEngine(web_model, max_kv_bytes=1000))
    with live_server(tiny_budget) as base:
        st, err = call(f"{base}/api/conversations", "POST", png)
        assert st == 400 and err["kind"] == "ContextOverflowError" and "cannot hold even the first round" in err["error"]
    pytest.importorskip("tritonclient.grpc")
    import segllm_edge

    closed = bind("127.0.0.1", 0)   # a port nobody answers on
    port = closed.getsockname()[1]
    closed.close()
    gone = ConversationStore(RemoteEngine(segllm_edge.connect(f"127.0.0.1:{port}", timeout_s=20, retry=1)))
    with live_server(gone) as base:
        st, conv = call(f"{base}/api/conversations", "POST", png)
        assert st == 201
        st, err = ask(base, conv["id"], "Segment the red circle.")
        assert st in (404, 502) and err["kind"] in ("SessionError", "BackendError")
        assert "unreachable" in err["error"] or "failed" in err["error"], err
        assert "Traceback" not in err["error"]


# ------------------------------------------------------------------------------------------- browser
def _chromium():
    """(chromium, chromedriver) paths, or a failure saying what is missing (`make test` installs them)."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[test]')")
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not browser or not driver:
        pytest.fail("no chromium/chromedriver here: run `make system-deps` (Debian's chromium and chromium-driver)")
    return webdriver, browser, driver


@pytest.fixture
def browser(tmp_path):
    webdriver, binary, driver_path = _chromium()
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1360,900", f"--user-data-dir={tmp_path / 'profile'}"):
        opts.add_argument(flag)
    drv = webdriver.Chrome(service=Service(executable_path=driver_path), options=opts)
    drv.set_page_load_timeout(60)
    try:
        yield drv
    finally:
        drv.quit()


def test_browser_upload_two_rounds_with_reference_errors_and_second_user(browser, web_model, golden_image, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    drv = browser

    def wait(cond, timeout=30, what=""):
        return WebDriverWait(drv, timeout, poll_frequency=0.2).until(lambda d: cond(), message=what)

    def el(css):
        return drv.find_element(By.CSS_SELECTOR, css)

    def error_text():
        box = el("#error")
        return box.text if box.is_displayed() else ""

    def layer_pixels(k):
        """Opaque-ish pixels of round k's overlay layer as the browser decoded it."""
        return drv.execute_script("""
            const img = document.querySelector(`#layers img[data-round="${arguments[0]}"]`);
            if (!img || !img.complete || !img.naturalWidth) return -1;
            const c = document.createElement('canvas'); c.width = img.naturalWidth; c.height = img.naturalHeight;
            const g = c.getContext('2d'); g.drawImage(img, 0, 0);
            const d = g.getImageData(0, 0, c.width, c.height).data; let n = 0;
            for (let i = 3; i < d.length; i += 4) if (d[i] > 0) n++;
            return n;""", k)

    store = ConversationStore(LocalEngine(web_model), max_conversations=4)
    with live_server(store) as base:
        drv.get(base + "/")
        wait(lambda: drv.execute_script("return document.body.dataset.ready") == "1", what="page did not start")
        assert "SegLLM" in drv.title and "backend=onnxruntime" in el("#model").text

        # upload, round 1
        el("#file-input").send_keys(str(golden_image))
        wait(lambda: el("#stage").is_displayed() and drv.execute_script(
            "return document.getElementById('base').naturalWidth") == 640, what="uploaded image not shown")
        q = el("#question")
        q.send_keys("Segment the red circle.\n")
        wait(lambda: drv.find_elements(By.CSS_SELECTOR, 'li.round[data-round="1"]') or error_text(),
             ROUND_TIMEOUT_S, "round 1 did not answer")
        assert not error_text()
        wait(lambda: layer_pixels(1) > 0, what="round 1's overlay did not appear")
        conv = next(c for c in store._live.values() if c is not None)
        mask1 = np.asarray(conv.results[0].mask)
        assert layer_pixels(1) >= int(mask1.sum())    # fill + outline + box + number

        # round 2 refers to round 1 by clicking its mask in the image
        q.send_keys("Segment the blue square next to it.")
        ys, xs = np.nonzero(mask1)
        i = len(ys) // 2
        base_img = el("#base")
        scale = base_img.size["width"] / 640
        ActionChains(drv).move_to_element_with_offset(
            base_img, int((xs[i] + 0.5) * scale - base_img.size["width"] / 2),
            int((ys[i] + 0.5) * scale - base_img.size["height"] / 2)).click().perform()
        wait(lambda: q.get_attribute("value").endswith("[REF:1]"), what="clicking round 1's mask inserted no [REF:1]")
        el("#ask").click()
        wait(lambda: drv.find_elements(By.CSS_SELECTOR, 'li.round[data-round="2"]') or error_text(),
             ROUND_TIMEOUT_S, "round 2 did not answer")
        assert not error_text()
        r2 = el('li.round[data-round="2"]')
        assert "refers to round 1" in r2.text and conv.results[1].refs == (1,)
        wait(lambda: layer_pixels(2) > 0, what="round 2's overlay did not appear")
        assert len(drv.find_elements(By.CSS_SELECTOR, "#layers img")) == 2
        assert drv.find_elements(By.CSS_SELECTOR, 'li.round[data-round="2"] .chart .seg'), "no latency chart"
        # the downloads the page links to: masks (zip of PNGs), the overlay with its legend, the conversation
        import base64
        import zipfile

        st, z = call(el("#dl-masks").get_attribute("href"))
        names = zipfile.ZipFile(io.BytesIO(z)).namelist()
        assert st == 200 and names == ["round1_mask.png", "round2_mask.png"]
        st, png = call(el("#dl-overlay").get_attribute("href"))
        assert st == 200 and Image.open(io.BytesIO(png)).size[1] > 480
        st, doc = call(el("#dl-json").get_attribute("href"))
        assert st == 200 and [r["refs"] for r in doc["rounds"]] == [[], [1]]
        m2 = np.asarray(Image.open(io.BytesIO(base64.b64decode(doc["rounds"][1]["mask_png_base64"])))) > 0
        assert np.array_equal(m2, conv.results[1].mask)

        # earlier rounds toggle; clicking a round's number refers to it too
        el('li.round[data-round="1"] .toggle').click()
        assert not el('#layers img[data-round="1"]').is_displayed()
        el('li.round[data-round="1"] .toggle').click()
        el('li.round[data-round="2"] .ref').click()
        assert q.get_attribute("value") == "[REF:2]"

        # errors are shown in the page: a bad reference, then a full context (this conversation's budget
        # tightened to what it holds, so any further round is refused before it runs)
        q.clear()
        q.send_keys("Segment the object left of it.[REF:7]\n")
        wait(lambda: "refers to round 7" in error_text(), what="bad reference not shown")
        assert "Traceback" not in error_text() and len(conv.results) == 2
        conv.session.max_kv_bytes = conv.session.context_length * web_model.info.kv_bytes_per_token()
        q.clear()
        q.send_keys("Segment the yellow rectangle.\n")
        wait(lambda: "budget" in error_text(), what="context-full error not shown")
        drv.save_screenshot(str(tmp_path / "web_errors.png"))
        el("#error-close").click()
        q.clear()
        ActionChains(drv).move_to_element(el("header h1")).perform()   # no round hovered (it dims the others)
        shot = Path(os.environ.get("SEGLLM_WEB_SCREENSHOT", tmp_path / "web.png"))
        drv.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000

        # a second user (another tab: its own conversation): unreadable upload, then the bundled image
        first = drv.current_window_handle
        drv.switch_to.new_window("tab")
        drv.get(base + "/")
        wait(lambda: drv.execute_script("return document.body.dataset.ready") == "1")
        notes = tmp_path / "notes.txt"
        notes.write_text("not an image")
        el("#file-input").send_keys(str(notes))
        wait(lambda: "'notes.txt' is not an image" in error_text(), what="unreadable image not reported")
        el("#use-bundled").click()
        wait(lambda: el("#stage").is_displayed(), what="bundled image not shown")
        assert not error_text() and len(store) == 2
        el("#question").send_keys("Segment it.[REF:1]\n")
        wait(lambda: "no round has been answered yet" in error_text(), what="second user's bad reference")

        # the first tab still has its two rounds; then the server goes away and the page says so
        drv.switch_to.window(first)
        assert len(drv.find_elements(By.CSS_SELECTOR, "#rounds li.round")) == 2
    q = el("#question")
    q.send_keys("Segment the green triangle.\n")
    wait(lambda: "not answering" in error_text(), what="a stopped server was not reported")


# ------------------------------------------------------------------------------------------- command
def test_web_command_refuses_bad_arguments_before_loading(tmp_path):
    from click.testing import CliRunner

    from segllm_edge.cli import main

    runner = CliRunner()
    r = runner.invoke(main, ["web", "--help"])
    assert r.exit_code == 0 and "--connect" in r.output and "7860" in r.output and "127.0.0.1" in r.output
    r = runner.invoke(main, ["web", "--checkpoint", str(tmp_path), "--export", str(tmp_path)])
    assert r.exit_code != 0 and "one of --checkpoint, --export or --connect" in r.output
    held = bind("127.0.0.1", 0)
    try:
        r = runner.invoke(main, ["web", "--checkpoint", str(tmp_path / "none"), "--port", str(held.getsockname()[1])])
        assert r.exit_code != 0 and "already in use" in r.output
    finally:
        held.close()
    r = runner.invoke(main, ["web", "--checkpoint", str(tmp_path / "none"), "--port", "0"])
    assert r.exit_code != 0 and "no such checkpoint" in r.output and "Traceback" not in r.output


def test_uploads_are_held_to_the_package_limits():
    """decode_upload checks segllm_edge.limits (one definition with the API and the server) before decoding."""
    import struct
    import zlib

    from segllm_edge.errors import ImageError
    from segllm_edge.limits import MAX_ASPECT_RATIO, MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS

    buf = io.BytesIO()
    Image.new("RGB", (int(MAX_ASPECT_RATIO) * 10 + 10, 10)).save(buf, "PNG")
    with pytest.raises(ImageError, match="aspect ratio of 21:1, over the limit of 20:1"):
        decode_upload(buf.getvalue(), "wide.png")

    # a PNG header declaring more pixels than the limit: refused from the header, nothing decoded
    side = int(MAX_IMAGE_PIXELS ** 0.5) + 1
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    with pytest.raises(ImageError, match=f"over the limit of {MAX_IMAGE_PIXELS} pixels"):
        decode_upload(png, "huge.png")

    with pytest.raises(ImageError, match=f"over the limit of {MAX_IMAGE_BYTES} bytes"):
        decode_upload(b"\0" * (MAX_IMAGE_BYTES + 1), "big.bin")
