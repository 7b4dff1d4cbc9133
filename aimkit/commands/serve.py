"""``aimkit serve``: a local web page that generates image grids with one model.

::

    aimkit serve --model aim-tiny-shapes                 # then open http://127.0.0.1:7860/
    aimkit serve --model aim-tiny-shapes --port 0        # any free port (the address is printed)

The page chooses a class by name, guidance, temperature, top-k, top-p, seed and count, and shows
the grid. The model generates one grid at a time; ``--queue`` more requests may wait, and any
beyond them are answered 429. Ctrl-C stops the server. The page has no authentication: keep the
default ``--host 127.0.0.1`` unless the network is yours.
"""

from __future__ import annotations

import ipaddress
import sys

from ..errors import ConfigError
from ._args import add_device_arguments, add_weight_arguments, bounded_int, weights_for
from ._args import positive_int as _positive_int
from ._args import resolve_device as _device

HELP = "start a local web page that generates image grids"
DESCRIPTION = __doc__.split("\n\n")[0]

__all__ = ["HELP", "add_arguments", "run"]


_port = bounded_int(0, 65535, "a port in [0, 65535] (0 = any free port)")
_queue = bounded_int(0, 1000, "a queue length in [0, 1000]")


def add_arguments(parser) -> None:
    parser.add_argument(
        "--model", required=True, help="preset name (see `aimkit list`) or a save_pretrained directory"
    )
    add_weight_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=_port, default=7860, help="port (default 7860; 0 = any free port)")
    parser.add_argument("--queue", type=_queue, default=4, metavar="N",
                        help="requests that may wait while one grid generates; more get HTTP 429 (default 4)")
    parser.add_argument("--max-count", type=_positive_int, default=16, metavar="N",
                        help="the most images one request may ask for (default 16)")
    add_device_arguments(parser)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _bind(host: str, port: int):
    from ..serve import make_server

    try:
        return make_server(None, host, port)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        hint = "; choose another --port (0 = any free one)" if "in use" in reason.lower() else ""
        raise ConfigError(f"cannot listen on {host}:{port}: {reason}{hint}") from None


def run(args) -> int:
    from ..build import build
    from ..serve import DemoApp

    # an unknown model or one without weights fails in a moment, before the port and the build
    pretrained = weights_for(args.model, args.pretrained, args.random_weights)
    device = _device(args.device)
    server = _bind(args.host, args.port)
    try:
        model = build(args.model, pretrained=pretrained, device=device, dtype=args.dtype)
        server.app = DemoApp(model, name=str(args.model), max_queue=args.queue, max_count=args.max_count)
        if not _is_loopback(args.host):
            print(f"warning: listening on {args.host}: anyone who can reach it can use this model "
                  "(the page has no authentication)", file=sys.stderr)
        print(f"serving {args.model} on {model.device} at {server.url} (Ctrl-C to stop)", flush=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            print("stopped", flush=True)
    finally:
        server.server_close()
    return 0
