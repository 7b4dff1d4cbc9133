"""A save_pretrained folder has one writer at a time; a config.json that lacks settings says which
defaults took their place; the demo answers HEAD with the page's headers and no body."""

from __future__ import annotations

import http.client
import json
import threading
import warnings

import pytest

import aimkit
from aimkit._lock import LOCK_NAME, FolderBusyError, FolderLock
from aimkit.serve import DemoApp, make_server


@pytest.fixture(scope="module")
def tiny():
    return aimkit.build("aim-tiny-shapes", pretrained=False)


def test_a_save_into_a_folder_another_writer_holds_is_refused_and_changes_nothing(tiny, tmp_path):
    tiny.save_pretrained(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    with FolderLock(tmp_path, command="another save"):
        with pytest.raises(FolderBusyError, match="another save"):
            tiny.save_pretrained(tmp_path, include_tokenizer=False)
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file() and p.name != LOCK_NAME}
    assert after == before
    (tmp_path / LOCK_NAME).unlink()  # the other writer's lock file
    tiny.save_pretrained(tmp_path)  # the lock went with its owner
    aimkit.build(tmp_path)
    assert not (tmp_path / LOCK_NAME).exists()  # a saved model folder holds the model's files only


def _edited(tiny, tmp_path, edit):
    tiny.save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    config = json.loads(path.read_text())
    edit(config["generator"])
    path.write_text(json.dumps(config))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        aimkit.build(tmp_path)
    return [str(w.message) for w in caught if "does not set" in str(w.message)]


def test_a_complete_saved_config_loads_without_a_defaults_warning(tiny, tmp_path):
    assert _edited(tiny, tmp_path, lambda generator: None) == []


def test_settings_missing_from_a_saved_config_are_named_with_the_defaults_used(tiny, tmp_path):
    def drop(generator):
        del generator["norm_eps"]
        del generator["backbone"]["config"]["dt_max"]

    messages = _edited(tiny, tmp_path, drop)
    assert len(messages) == 1
    assert "norm_eps=1e-05" in messages[0] and "backbone.config.dt_max=0.1" in messages[0]
    assert "d_model" not in messages[0]  # only what the file lacks


def test_the_demo_answers_head_with_headers_only_and_keeps_the_connection_usable(tiny):
    server = make_server(DemoApp(aimkit.build("aim-tiny-shapes")), "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        connection = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=60)
        connection.request("GET", "/")
        page = connection.getresponse()
        body = page.read()
        connection.request("HEAD", "/")
        head = connection.getresponse()
        assert head.status == 200 and head.read() == b""
        assert head.getheader("Content-Length") == str(len(body))
        connection.request("HEAD", "/generate?class=0")
        refused = connection.getresponse()
        refused.read()
        assert refused.status == 405 and refused.getheader("Allow") == "GET"
        connection.request("GET", "/")  # the same connection: a GET after a HEAD has its body
        again = connection.getresponse()
        assert again.status == 200 and again.read() == body
        connection.close()
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)
