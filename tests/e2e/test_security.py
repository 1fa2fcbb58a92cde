"""Security of a live server: owner-only IPC sockets, and request fields that name files or network addresses
(image parts, remote JSON-schema references, template overrides) answered without any file or network access."""

from __future__ import annotations

import json
import os
import socket
import stat
import threading

import pytest

from server_harness import LiveServer

KEY = "sekret"


class Listener:
    """A TCP listener on 127.0.0.1 that records every connection made to it."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


@pytest.fixture(scope="module")
def tmpdir_server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tmp")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TMPDIR", str(tmp))  # the engine's IPC directory lands here, where the test can find it
        s = LiveServer("--max-total-tokens", "2048", api_key=KEY)
    yield s, tmp
    s.stop()


@pytest.fixture
def listener():
    lis = Listener()
    yield lis
    lis.close()


def test_ipc_sockets_are_owner_only(tmpdir_server):
    _, tmp = tmpdir_server
    (ipc_dir,) = [p for p in tmp.iterdir() if p.name.startswith("radixlm-")]
    mode = ipc_dir.stat()
    assert stat.S_IMODE(mode.st_mode) == 0o700 and mode.st_uid == os.getuid()
    sockets = sorted(ipc_dir.iterdir())
    assert [p.name for p in sockets] == ["in", "out"]
    for path in sockets:
        st = path.stat()
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == os.getuid()


def chat(server: LiveServer, **body):
    return server.request("POST", "/v1/chat/completions", {"max_tokens": 2, **body}, timeout=60)


@pytest.mark.parametrize("scheme", ["file", "http"])
def test_image_parts_are_refused_without_fetching_them(tmpdir_server, listener, tmp_path, scheme):
    server, _ = tmpdir_server
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"not an image")
    url = secret.as_uri() if scheme == "file" else f"http://127.0.0.1:{listener.port}/cat.png"
    for part in ({"type": "image_url", "image_url": {"url": url}}, {"type": "input_image", "image_url": url}):
        status, out = chat(server, messages=[{"role": "user", "content": [{"type": "text", "text": "hi"}, part]}])
        assert status == 400 and "image" in out["error"]["message"], out
    assert listener.connections == 0


def test_json_schema_references_are_never_fetched(tmpdir_server, listener):
    server, _ = tmpdir_server
    for ref in (f"http://127.0.0.1:{listener.port}/schema.json", "file:///etc/passwd"):
        schema = {"type": "object", "properties": {"a": {"$ref": ref}}}
        status, out = chat(server, messages=[{"role": "user", "content": "hi"}],
                           response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
        assert status < 500, out
        assert "root:" not in json.dumps(out)  # nothing of /etc/passwd comes back
    assert listener.connections == 0
    assert server.request("GET", "/health")[0] == 200


def test_a_request_cannot_replace_the_chat_template(tmpdir_server):
    server, _ = tmpdir_server
    evil = "{{ cycler.__init__.__globals__.os.popen('id').read() }}"
    status, out = chat(server, messages=[{"role": "user", "content": "hi"}],
                       chat_template_kwargs={"chat_template": evil})
    assert status == 400, out
    status, out = chat(server, model="/etc/passwd", messages=[{"role": "user", "content": "hi"}])
    assert status == 200 and out["model"] != "/etc/passwd"  # `model` names nothing to load
