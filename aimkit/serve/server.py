"""HTTP for the demo, on the standard library's :class:`http.server.ThreadingHTTPServer`.

Routes (GET only):

* ``/``: the page (:mod:`aimkit.serve._page`).
* ``/generate?class=...&cfg_scale=...&temperature=...&top_k=...&top_p=...&seed=...&count=...``:
  ``image/png``, the grid, with headers ``X-Aimkit-Seed``, ``X-Aimkit-Labels`` and
  ``X-Aimkit-Seconds``; ``400`` with the one-line message for a bad value; ``429`` (with
  ``Retry-After``) when the queue is full; ``500`` for anything else (logged with its traceback).

Each connection gets a thread, but the model runs one grid at a time (:class:`~aimkit.serve.app.DemoApp`).
Requests are logged through :mod:`logging` (logger ``aimkit.serve``), not printed.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from ..errors import AimkitError
from ._page import render_page
from .app import BusyError, DemoApp

__all__ = ["DemoServer", "make_server", "RETRY_AFTER_S"]

logger = logging.getLogger("aimkit.serve")

RETRY_AFTER_S = 5  # what a 429 tells the client to wait
_MAX_FIELDS = 32  # form fields parsed at most (there are 7)
IDLE_TIMEOUT_S = 60  # seconds a connection may wait for its next request (or the rest of one)


class _Handler(BaseHTTPRequestHandler):
    server: DemoServer
    server_version = "aimkit-serve"
    protocol_version = "HTTP/1.1"  # keep-alive; every answer carries its Content-Length
    timeout = IDLE_TIMEOUT_S  # a connection silent this long is closed (its thread freed)
    _head_only = False  # set for a HEAD request: headers (Content-Length too) without the body

    def do_GET(self) -> None:  # the name http.server calls
        url = urlsplit(self.path)
        if url.path in ("/", "/index.html"):
            self._send(HTTPStatus.OK, render_page(self.server.app).encode(), "text/html; charset=utf-8")
        elif url.path == "/generate":
            self._generate(url.query)
        else:
            self._text(HTTPStatus.NOT_FOUND, f"no page {url.path!r}; the demo is at /")

    def do_HEAD(self) -> None:  # the page's headers without its body; /generate is not run for a HEAD
        self._head_only = True  # this handler serves the connection's later requests too
        try:
            if urlsplit(self.path).path == "/generate":
                self._text(HTTPStatus.METHOD_NOT_ALLOWED, "GET /generate makes the images; HEAD does not",
                           {"Allow": "GET"})
            else:
                self.do_GET()
        finally:
            self._head_only = False

    def _generate(self, query: str) -> None:
        try:
            fields = parse_qs(query, keep_blank_values=True, max_num_fields=_MAX_FIELDS)
            result = self.server.app.handle(fields)
        except BusyError as exc:
            self._text(HTTPStatus.TOO_MANY_REQUESTS, str(exc), {"Retry-After": str(RETRY_AFTER_S)})
            return
        except AimkitError as exc:
            self._text(HTTPStatus.BAD_REQUEST, str(exc))
            return
        except ValueError as exc:  # parse_qs: too many fields, bad encoding
            self._text(HTTPStatus.BAD_REQUEST, f"bad query: {exc}")
            return
        except Exception:  # a bug: the client gets a line, the log the traceback
            logger.exception("generating %s failed", query)
            self._text(HTTPStatus.INTERNAL_SERVER_ERROR, "internal error while generating; see the server's log")
            return
        request = result.request
        headers = {
            "X-Aimkit-Seed": str(request.seed),
            "X-Aimkit-Labels": ",".join(map(str, request.labels)),
            "X-Aimkit-Seconds": f"{result.seconds:.2f}",
        }
        self._send(HTTPStatus.OK, result.png, "image/png", headers)

    def _text(self, status: HTTPStatus, message: str, headers: dict | None = None) -> None:
        line = " ".join(message.split())  # one line, whatever the message held
        self._send(status, f"{line}\n".encode(), "text/plain; charset=utf-8", headers)

    def _send(self, status: HTTPStatus, body: bytes, content_type: str, headers: dict | None = None) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Content-Type-Options", "nosniff")
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            if not self._head_only:
                self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # the client left before the answer
            logger.info("client %s left before the answer", self.client_address[0])

    def log_message(self, format: str, *args) -> None:  # http.server's signature
        logger.info("%s %s", self.address_string(), format % args)


class DemoServer(ThreadingHTTPServer):
    """A threading HTTP server holding the :class:`~aimkit.serve.app.DemoApp` it serves.

    ``app`` may be set after binding (the command binds the port before the slow model build),
    but before :meth:`serve_forever`.
    """

    daemon_threads = True  # connection threads never keep the process alive after shutdown
    CLOSE_WAIT_S = 2.0  # how long server_close waits for each open connection's thread to end

    def __init__(self, address: tuple[str, int], app: DemoApp | None = None) -> None:
        # before binding: a failed bind calls server_close
        self._connections: dict[threading.Thread, socket.socket] = {}  # open ones, by their thread
        self._connections_lock = threading.Lock()
        super().__init__(address, _Handler)
        self.app = app

    def process_request_thread(self, request, client_address) -> None:  # runs in the connection's thread
        with self._connections_lock:
            self._connections[threading.current_thread()] = request
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._connections_lock:
                self._connections.pop(threading.current_thread(), None)

    def server_close(self) -> None:
        """Stop listening, end the open connections (an idle keep-alive one would wait its timeout)
        and wait for their threads, so none still runs (or writes a log line) while the process exits."""
        super().server_close()
        with self._connections_lock:
            open_now = list(self._connections.items())
        for _thread, request in open_now:
            with contextlib.suppress(OSError):
                request.shutdown(socket.SHUT_RDWR)
        for thread, _request in open_now:
            thread.join(self.CLOSE_WAIT_S)

    @property
    def url(self) -> str:
        """``http://host:port/`` as bound (the real port when 0 was asked for)."""
        host, port = self.server_address[:2]
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{port}/"


def make_server(app: DemoApp | None, host: str = "127.0.0.1", port: int = 7860) -> DemoServer:
    """Bind the demo's server (``port=0``: a free port, see :attr:`DemoServer.url`); call
    ``serve_forever()`` on it, and ``shutdown()`` + ``server_close()`` from another thread to stop.

    Raises:
        OSError: the address cannot be bound (in use, not this machine's, no permission).
    """
    cls = DemoServer
    if ":" in host:  # an IPv6 address
        cls = type("DemoServer6", (DemoServer,), {"address_family": socket.AF_INET6})
    return cls((host, port), app)
