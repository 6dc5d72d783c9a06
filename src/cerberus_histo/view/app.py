"""The viewer's HTTP API (Starlette), read-only. Routes (``{id}`` is an item's index; no route takes a file path)::

    GET /                                                   the static index.html
    GET /static/{path}                                      the package's static files (nothing outside them)
    GET /api/items                                          {"items": [{"id", "name", "kind", "width", "height", "mpp"}]}
    GET /api/items/{id}                                     the same and "dzi", "tile_size", "overlap", "tasks", "summary"
    GET /api/items/{id}/image.dzi                           Deep Zoom XML
    GET /api/items/{id}/image_files/{level}/{col}_{row}.jpeg      an image tile
    GET /api/items/{id}/overlay_files/{level}/{col}_{row}.png?hide=TOKENS   the RGBA overlay tile of that address
    GET /api/items/{id}/object?x=X&y=Y                      {"object": null | {"task", "class", "probability",
                                                             "area_um2", "parent_gland", "id"}}

Sizes and coordinates are level-0 pixels. Rendered tiles are kept in an LRU cache; an item's geometry caches are
built in the background when its info is first asked for. Listening on a loopback address, only requests naming a
local host are answered, so a web page elsewhere cannot reach the viewer through DNS rebinding.
"""

from __future__ import annotations

import io
import ipaddress
import math
import threading
from collections import OrderedDict
from pathlib import Path

import shapely
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from ..io.files import encode_image
from ..outputs.records import UNCLASSIFIED
from .items import Item, find_items
from .render import Overlay, parse_hide

STATIC = Path(__file__).resolve().parent / "static"
#: object lookup preference: the smallest objects first
PICK_ORDER = ("nuclei", "lumen", "gland", "tissue")
POINT_RADIUS = 3.0  # a click this close to a Point object picks it
KEEP_ITEMS = 3  # items whose geometry caches stay in memory
LOCAL_HOSTS = ("127.0.0.1", "localhost", "[::1]", "testserver")  # testserver: Starlette's TestClient


class LRU:
    """A thread-safe least-recently-used cache of ``max_items`` values."""

    def __init__(self, max_items: int):
        self.max_items = max_items
        self._data: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key):
        with self._lock:
            value = self._data.get(key)
            if value is not None:
                self._data.move_to_end(key)
            return value

    def put(self, key, value) -> None:
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self.max_items:
                self._data.popitem(last=False)


class Viewer:
    """The items and their tile caches behind the routes."""

    def __init__(self, items: list[Item], cache_tiles: int = 2048):
        self.items = items
        self.overlays = [Overlay(item) for item in items]
        self.images = LRU(cache_tiles)
        self.tiles = LRU(cache_tiles)
        self._preloading: set[int] = set()
        self._recent: OrderedDict[int, None] = OrderedDict()  # items whose geometry caches are kept
        self._lock = threading.Lock()

    def item(self, request: Request) -> Item | None:
        text = request.path_params["id"]
        if not text.isdigit() or int(text) >= len(self.items):
            return None
        return self.items[int(text)]

    def used(self, item: Item) -> None:
        """Note that ``item`` is shown; the geometry caches of all but the :data:`KEEP_ITEMS` items shown last are
        dropped (a cohort's slides each hold tens of MB)."""
        with self._lock:
            self._recent[item.index] = None
            self._recent.move_to_end(item.index)
            while len(self._recent) > KEEP_ITEMS:
                old, _ = self._recent.popitem(last=False)
                self._preloading.discard(old)
                self.overlays[old].clear()

    def preload(self, item: Item) -> None:
        """Build the item's geometry caches in the background (tiles asked meanwhile wait for what they need)."""
        self.used(item)
        with self._lock:
            if item.index in self._preloading:
                return
            self._preloading.add(item.index)
        threading.Thread(target=self._preload, args=(item,), daemon=True, name=f"preload-{item.id}").start()

    def _preload(self, item: Item) -> None:
        try:
            self.overlays[item.index].preload()
        except Exception:  # the tile requests that need the cache raise it again, as HTTP 500s
            with self._lock:
                self._preloading.discard(item.index)

    def image_tile(self, item: Item, level: int, col: int, row: int) -> bytes:
        key = (item.index, level, col, row)
        data = self.images.get(key)
        if data is None:
            buf = io.BytesIO()
            item.image_tile(level, col, row).save(buf, "jpeg", quality=85)
            data = buf.getvalue()
            self.images.put(key, data)
        return data

    def overlay_tile(self, item: Item, level: int, col: int, row: int, hide: frozenset[str]) -> bytes:
        key = (item.index, level, col, row, hide)
        data = self.tiles.get(key)
        if data is None:
            self.used(item)
            data = encode_image(self.overlays[item.index].tile(level, col, row, hide), fast=True)
            self.tiles.put(key, data)
        return data

    def pick(self, item: Item, x: float, y: float) -> dict | None:
        """The object at level-0 point ``(x, y)``: one whose geometry contains it (Points: within
        :data:`POINT_RADIUS` px), nuclei first, then lumina, glands and tissue regions; the nearest centroid among
        several of one task."""
        r = POINT_RADIUS
        hits = item.store().query((x - r, y - r, x + r, y + r))
        point = shapely.Point(x, y)
        best = None
        for a in hits:
            g = a.geometry
            inside = g.distance(point) <= r if g.geom_type == "Point" else g.covers(point)
            if not inside:
                continue
            task = a.properties.get("task")
            rank = (PICK_ORDER.index(task) if task in PICK_ORDER else len(PICK_ORDER), g.centroid.distance(point))
            if best is None or rank < best[0]:
                best = (rank, a)
        if best is None:
            return None
        p = best[1].properties
        prob = p.get("type_prob", p.get("class_prob"))
        return {"task": p.get("task"), "class": p.get("type") or UNCLASSIFIED,
                "probability": prob, "area_um2": p.get("area_um2"),
                "parent_gland": p.get("parent_gland") if p.get("task") == "lumen" else None, "id": p.get("id")}


def _loopback(host: str) -> bool:
    """Whether ``host`` is this machine only (there, requests must name a local host: no DNS rebinding)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _not_found(what: str = "not found") -> JSONResponse:
    return JSONResponse({"error": what}, status_code=404)


class _FreshStatic(StaticFiles):
    """The page's files, revalidated on every load (``no-cache``): after an upgrade the browser never keeps an old
    ``viewer.js`` beside a new server."""

    def file_response(self, *args, **kwargs):
        response = super().file_response(*args, **kwargs)
        response.headers["Cache-Control"] = "no-cache"
        return response


def make_app(results, slide=None, host: str = "127.0.0.1") -> Starlette:
    """The viewer's Starlette app for RESULTS (a result folder or a ``.db`` store; ``slide`` replaces the recorded
    image path of a single result). Every result is checked here, before any server starts (one-line
    :class:`~cerberus_histo.errors.CerberusError` s). ``host``: the address the server listens on (requests naming
    another host are refused; any host for ``0.0.0.0`` / ``::``)."""
    viewer = Viewer(find_items(Path(results), None if slide is None else Path(slide)))

    def index(request: Request):
        page = STATIC / "index.html"
        if not page.is_file():
            return _not_found("the viewer's index.html is missing")
        return FileResponse(page, headers={"Cache-Control": "no-cache"})

    def items(request: Request):
        return JSONResponse({"items": [item.brief() for item in viewer.items]})

    def info(request: Request):
        item = viewer.item(request)
        if item is None:
            return _not_found("no such item")
        viewer.preload(item)
        return JSONResponse(item.info())

    def dzi(request: Request):
        item = viewer.item(request)
        if item is None:
            return _not_found("no such item")
        return Response(item.deepzoom.get_dzi("jpeg"), media_type="application/xml")

    def _address(request: Request):
        item = viewer.item(request)
        p = request.path_params
        level, col, row = p["level"], p["col"], p["row"]
        if item is None or level >= item.deepzoom.level_count:
            return None
        cols, rows = item.deepzoom.level_tiles[level]
        return (item, level, col, row) if col < cols and row < rows else None

    def image_tile(request: Request):
        address = _address(request)
        if address is None:
            return _not_found("no such tile")
        return Response(viewer.image_tile(*address), media_type="image/jpeg")

    def overlay_tile(request: Request):
        address = _address(request)
        if address is None:
            return _not_found("no such tile")
        hide = parse_hide(request.query_params.get("hide"))
        return Response(viewer.overlay_tile(*address, hide), media_type="image/png")

    def pick(request: Request):
        item = viewer.item(request)
        if item is None:
            return _not_found("no such item")
        try:
            x, y = float(request.query_params["x"]), float(request.query_params["y"])
            if not (math.isfinite(x) and math.isfinite(y)):
                raise ValueError
        except (KeyError, ValueError):
            return JSONResponse({"error": "x and y must be numbers (level-0 pixels)"}, status_code=400)
        return JSONResponse({"object": viewer.pick(item, x, y)})

    tile = "/api/items/{id}/{kind}_files/{level:int}/{col:int}_{row:int}"
    routes = [
        Route("/", index),
        Route("/api/items", items),
        Route("/api/items/{id}", info),
        Route("/api/items/{id}/image.dzi", dzi),
        Route(tile.replace("{kind}", "image") + ".jpeg", image_tile),
        Route(tile.replace("{kind}", "overlay") + ".png", overlay_tile),
        Route("/api/items/{id}/object", pick),
        Mount("/static", _FreshStatic(directory=STATIC, check_dir=False), name="static"),
    ]
    hosts = sorted({*LOCAL_HOSTS, f"[{host}]" if ":" in host else host}) if _loopback(host) else ["*"]
    app = Starlette(routes=routes, middleware=[Middleware(TrustedHostMiddleware, allowed_hosts=hosts)])
    app.state.viewer = viewer
    return app


__all__ = ["LRU", "Viewer", "make_app"]
