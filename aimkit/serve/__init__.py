"""A local web demo: a form (class by name, guidance, temperature, top-k, top-p, seed, count) that
shows the generated grid. Started by ``aimkit serve --model aim-tiny-shapes``; see docs/serve.md.

Example::

    import aimkit
    from aimkit.serve import DemoApp, make_server

    server = make_server(DemoApp(aimkit.build("aim-tiny-shapes"), name="aim-tiny-shapes"), port=7860)
    server.serve_forever()

Built on the standard library's :mod:`http.server`: no dependency beyond aimkit's own.
"""

from .app import FIELDS, RANDOM_CLASS, BusyError, DemoApp, GridRequest, GridResult, model_class_names
from .server import RETRY_AFTER_S, DemoServer, make_server

__all__ = [
    "FIELDS",
    "RANDOM_CLASS",
    "RETRY_AFTER_S",
    "BusyError",
    "DemoApp",
    "DemoServer",
    "GridRequest",
    "GridResult",
    "make_server",
    "model_class_names",
]
