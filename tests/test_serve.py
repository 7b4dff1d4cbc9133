"""``aimkit serve``: the web demo, over plain HTTP and in headless Chromium.

The fast tests drive the server with ``urllib`` on a free port; the browser test opens the page in
Debian's ``chromium`` through selenium and skips (saying what is missing) without them. Run it with
``AIMKIT_SERVE_SCREENSHOT=docs/images/serve_demo.png`` to refresh the README's screenshot.
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from urllib.parse import urlencode

import numpy as np
import pytest
from PIL import Image

import aimkit
from aimkit.cli import main
from aimkit.serve import DemoApp, make_server

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def model():
    return aimkit.build("aim-tiny-shapes")  # the shipped weights


@contextmanager
def running(app):
    """The demo's server on a free port, serving from a thread; yields its URL."""
    server = make_server(app, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.url
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def fetch(url: str, timeout: float = 120):
    """(status, headers, body) of a GET, 4xx/5xx included."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as answer:
            return answer.status, answer.headers, answer.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers, error.read()


def fake_images(model, labels, **settings):
    """Stands in for samplers.generate where the pixels do not matter: (B, 8, 8, 3) uint8."""
    return np.full((len(labels), 8, 8, 3), 128, dtype=np.uint8)


# --------------------------------------------------------------------------------------- over HTTP
def test_page_offers_every_class_by_name_and_the_model_defaults(model):
    app = DemoApp(model, name="aim-tiny-shapes")
    with running(app) as url:
        status, headers, body = fetch(url)
    page = body.decode()
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert "aim-tiny-shapes" in page
    for name in app.class_names:
        assert f'<option value="{name}">' in page
    defaults = model.config.pretty_sampling
    assert f'name="cfg_scale" id="cfg_scale" inputmode="decimal" value="{defaults.cfg_scale:g}"' in page
    for field in ("class", "cfg_scale", "temperature", "top_k", "top_p", "seed", "count"):
        assert f'name="{field}"' in page


def test_generate_answers_a_png_grid_of_the_chosen_class(model):
    app = DemoApp(model)
    name = app.class_names[3]
    query = urlencode({"class": name, "count": 2, "seed": 7, "cfg_scale": 2, "temperature": 1, "top_k": 0,
                       "top_p": 1})
    with running(app) as url:
        status, headers, body = fetch(f"{url}generate?{query}")
        again = fetch(f"{url}generate?{query}")[2]
    assert status == 200 and headers["Content-Type"] == "image/png"
    assert body.startswith(PNG_SIGNATURE)
    assert headers["X-Aimkit-Labels"] == "3,3" and headers["X-Aimkit-Seed"] == "7"
    grid = Image.open(io.BytesIO(body))
    grid.load()
    size = 128  # aim-tiny-shapes draws 64 px images; the grid shows them at 2x
    assert grid.width > 2 * size and grid.height > size  # two images side by side, a caption below
    assert again == body  # the same seed gives the same grid


def test_blank_fields_take_the_defaults_and_random_classes_follow_the_seed(model):
    app = DemoApp(model)
    request = app.parse({"class": ["random"], "count": ["5"], "seed": ["11"], "cfg_scale": [""]})
    assert request.cfg_scale == model.config.pretty_sampling.cfg_scale
    assert len(request.labels) == 5 and all(0 <= label < model.num_classes for label in request.labels)
    assert app.parse({"class": ["random"], "count": ["5"], "seed": ["11"]}).labels == request.labels
    fresh = app.parse({})
    assert len(fresh.labels) == 1 and 0 <= fresh.seed < 2**31  # no seed: a fresh one, reported back


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"temperature": "-1"}, "temperature must be"),
        ({"temperature": "warm"}, "temperature must be a number"),
        ({"cfg_scale": "nan"}, "cfg_scale must be"),
        ({"top_p": "0"}, "top_p must be in (0, 1]"),
        ({"top_k": "1.5"}, "top_k must be an integer"),
        ({"top_k": "-3"}, "top_k must be an integer >= 0"),
        ({"count": "0"}, "count must be an integer in [1, 16]"),
        ({"count": "100000"}, "count must be an integer in [1, 16]"),
        ({"seed": "-1"}, "seed must be an integer in [0, 2**63)"),
        ({"seed": str(2**63)}, "seed must be an integer in [0, 2**63)"),
        ({"class": "purple circle"}, "unknown class 'purple circle'"),
        ({"class": "99"}, "unknown class '99'"),
        ({"temprature": "1"}, "did you mean 'temperature'"),
    ],
)
def test_bad_form_values_get_400_with_one_line(model, fields, message):
    calls = []
    app = DemoApp(model, generate_fn=lambda *a, **k: calls.append(a) or fake_images(*a, **k))
    with running(app) as url:
        status, headers, body = fetch(f"{url}generate?{urlencode(fields)}")
    text = body.decode()
    assert status == 400 and headers["Content-Type"].startswith("text/plain")
    assert message in text and text.count("\n") == 1 and text.endswith("\n")
    assert not calls  # refused before the model is touched


def test_a_repeated_field_gets_400(model):
    with running(DemoApp(model, generate_fn=fake_images)) as url:
        status, _, body = fetch(f"{url}generate?seed=1&seed=2")
    assert status == 400 and b"seed was given 2 times" in body


def test_classes_are_found_by_name_ignoring_case_and_misspellings_get_suggestions(model):
    names = [f"class {i}" for i in range(model.num_classes)]
    names[5] = "Golden Retriever"
    app = DemoApp(model, class_names=names)
    assert app.parse({"class": ["golden retriever"], "count": ["2"]}).labels == (5, 5)
    assert app.parse({"class": ["4"]}).labels == (4,)
    with pytest.raises(aimkit.errors.ConfigError, match="did you mean 'Golden Retriever'"):
        app.class_id("golden retreiver")


def test_a_full_queue_gets_429_and_generation_runs_one_at_a_time(model):
    started, release = threading.Event(), threading.Event()
    running_now, most = [0], [0]
    guard = threading.Lock()

    def blocking(*args, **kwargs):
        with guard:
            running_now[0] += 1
            most[0] = max(most[0], running_now[0])
        started.set()
        release.wait(60)
        with guard:
            running_now[0] -= 1
        return fake_images(*args, **kwargs)

    app = DemoApp(model, max_queue=1, generate_fn=blocking)
    with running(app) as url:
        answers = {}
        workers = [threading.Thread(target=lambda i=i: answers.__setitem__(i, fetch(f"{url}generate?seed={i}")))
                   for i in range(2)]
        workers[0].start()
        assert started.wait(30)  # the first request holds the model
        workers[1].start()
        deadline = time.monotonic() + 30
        while app.pending < 2 and time.monotonic() < deadline:  # the second one waits in the queue
            time.sleep(0.01)
        assert app.pending == 2
        status, headers, body = fetch(f"{url}generate?seed=9")
        assert status == 429 and headers["Retry-After"] == "5"
        assert body.decode().startswith("busy:") and body.count(b"\n") == 1
        release.set()
        for worker in workers:
            worker.join(30)
        assert [answers[i][0] for i in range(2)] == [200, 200]
        assert fetch(f"{url}generate?seed=3")[0] == 200  # the places are free again
    assert most[0] == 1 and app.pending == 0


def test_a_failure_inside_generation_gets_500_and_the_server_keeps_serving(model):
    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    with running(DemoApp(model, generate_fn=broken)) as url:
        status, _, body = fetch(f"{url}generate?seed=1")
        assert status == 500 and b"internal error" in body and b"boom" not in body
        assert fetch(url)[0] == 200


def test_unknown_paths_get_404(model):
    with running(DemoApp(model, generate_fn=fake_images)) as url:
        status, _, body = fetch(f"{url}etc/passwd")
    assert status == 404 and b"the demo is at /" in body


# --------------------------------------------------------------------------------------- the command
def test_serve_refuses_a_bad_port_and_a_port_in_use_in_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--model", "aim-tiny-shapes", "--port", "70000"])
    assert exit_info.value.code == 2
    assert "expected a port in [0, 65535]" in capsys.readouterr().err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--model", "aim-tiny-shapes", "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1:{port}" in err and err.count("\n") == 1


def test_serve_refuses_an_unknown_model_before_listening(capsys):
    assert main(["serve", "--model", "aim-tiny-shapez"]) == 2
    err = capsys.readouterr().err
    assert "aim-tiny-shapes" in err and err.count("\n") == 1


def test_serve_refuses_a_model_without_weights_unless_asked(capsys):
    assert main(["serve", "--model", "aim-b", "--port", "0"]) == 2  # refused before the (large) build
    err = capsys.readouterr().err
    assert "has no weights" in err and "--random-weights" in err and err.count("\n") == 1


def test_serve_command_serves_the_page_until_interrupted():
    proc = subprocess.Popen(
        [sys.executable, "-m", "aimkit", "serve", "--model", "aim-tiny-shapes", "--port", "0", "--device", "cpu"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    killer = threading.Timer(240, proc.kill)  # never hang the suite
    killer.start()
    try:
        line = proc.stdout.readline()
        assert line.startswith("serving aim-tiny-shapes on cpu at http://127.0.0.1:"), line
        url = line.split(" at ")[1].split()[0]
        status, _, body = fetch(url)
        assert status == 200 and b"aim-tiny-shapes" in body
        proc.send_signal(signal.SIGINT)
        code = proc.wait(60)
        rest = proc.stdout.read()
        assert code == 0, rest  # the server's last words, if it died
        assert "stopped" in rest
    finally:
        killer.cancel()
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()


# --------------------------------------------------------------------------------------- in Chromium
def _browser_missing() -> str:
    """Why the browser test cannot run here ("" when it can)."""
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        return "headless Chromium not installed (apt-get install chromium chromium-driver)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium not installed (pip install selenium)"
    return ""


def _chromium():
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=900,700"):
        options.add_argument(flag)
    service = webdriver.ChromeService(executable_path=shutil.which("chromedriver"))
    return webdriver.Chrome(options=options, service=service)


_GRID_WIDTH = "var g = document.getElementById('grid'); return g.complete && g.src ? g.naturalWidth : 0;"


@pytest.mark.skipif(bool(_browser_missing()), reason=_browser_missing() or "runs")
def test_the_page_shows_a_grid_in_headless_chromium(model):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    app = DemoApp(model, name="aim-tiny-shapes")
    with running(app) as url:
        browser = _chromium()
        try:
            browser.get(url)
            temperature = browser.find_element(By.ID, "temperature")
            temperature.clear()
            temperature.send_keys("-1")
            browser.find_element(By.ID, "go").click()  # a bad value: the server's line, no grid
            status = browser.find_element(By.ID, "status")
            WebDriverWait(browser, 60).until(lambda b: status.get_attribute("class") == "error")
            assert "temperature must be" in status.text
            temperature.clear()
            temperature.send_keys("1")
            Select(browser.find_element(By.ID, "class")).select_by_visible_text(app.class_names[4])
            count = browser.find_element(By.ID, "count")
            count.clear()
            count.send_keys("6")
            browser.find_element(By.ID, "go").click()
            width = WebDriverWait(browser, 180).until(lambda b: b.execute_script(_GRID_WIDTH))
            assert width > 0
            assert status.text.startswith("seed 0")
            _screenshot(browser)
        finally:
            browser.quit()


def _screenshot(browser) -> None:
    """With AIMKIT_SERVE_SCREENSHOT=PATH, save the page (for the README), atomically."""
    path = os.environ.get("AIMKIT_SERVE_SCREENSHOT")
    if not path:
        return
    from aimkit._io import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_bytes(browser.get_screenshot_as_png())
