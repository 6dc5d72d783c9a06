"""The web viewer (``cerberus view``): a result's slide or tiles with its objects on top, in a web browser.

:func:`serve` checks RESULTS (:mod:`.items`), then serves the front end (``static/``: a page with OpenSeadragon)
and a read-only HTTP API (:mod:`.app`): the image's Deep Zoom tiles and overlay tiles of the same grid drawn on the
server (:mod:`.render`), so the browser never receives polygons and stays fast on slides with millions of nuclei.
It listens on 127.0.0.1 unless told otherwise, serves nothing but the package's static files and the results' own
tiles and objects, and opens every store read-only.
"""

from __future__ import annotations

import socket
import sys
import threading
import time
from pathlib import Path

from ..errors import CerberusError
from .app import make_app


def _bind(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` (0: a free port), or a one-line error."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
    except (OSError, UnicodeError) as exc:
        raise CerberusError(f"cannot listen on {host}: {getattr(exc, 'strerror', None) or exc}; pass an address "
                            "of this machine with --host (default 127.0.0.1)") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise CerberusError(f"cannot listen on {host} port {port}: {exc.strerror or exc}; choose another --port "
                            "(0: any free port)") from None
    return sock


def url_of(sock: socket.socket, host: str) -> str:
    """``http://HOST:PORT/`` of a bound socket (IPv6 addresses in brackets)."""
    port = sock.getsockname()[1]
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/"


def serve(results, slide=None, host: str = "127.0.0.1", port: int = 0, open_browser: bool = False) -> None:
    """Serve the viewer of RESULTS (a result folder, or one ``.db`` store) until Ctrl-C; blocking.

    ``slide`` replaces the recorded slide or image path of a single result. Everything is checked before the server
    starts (one-line :class:`CerberusError` s). Once the server listens, ``Cerberus viewer: http://HOST:PORT/`` is
    printed to stderr (``port`` 0: a free port) and, with ``open_browser``, the page is opened in a web browser.
    """
    import uvicorn

    app = make_app(Path(results), None if slide is None else Path(slide), host=host)
    sock = _bind(host, port)
    url = url_of(sock, host)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off"))

    def announce():
        while not server.started and not server.should_exit:
            time.sleep(0.02)
        if server.started:
            print(f"Cerberus viewer: {url}", file=sys.stderr, flush=True)
            if open_browser:
                import webbrowser

                webbrowser.open(url)

    threading.Thread(target=announce, daemon=True, name="announce").start()
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn shuts down on Ctrl-C, then raises it again for its caller
        pass
    finally:
        sock.close()
    print("Cerberus viewer stopped", file=sys.stderr, flush=True)


__all__ = ["make_app", "serve"]
