"""The cluster page: `GET /` and its script, style and icon under `/ui/`, all without a token.

The page itself holds no cluster data: it is static, and its script asks the `/v2/*` read routes with a
credential the person types in (see docs/page.md). So it can be served to anyone, under a
Content-Security-Policy that lets it load and talk to this daemon only. The one read route the page adds,
`GET /v2/certificates` (the days left on the certificate served and on the cluster CA), is a reader route
like the others: the page's data never goes out without a credential.

The files ship inside the package (package data, see pyproject.toml) and are read once, when this module
is imported at start: a request never touches the disk. Their ETag is a digest of their bytes, and every
answer says `no-cache`, so a browser revalidates each load and a new daemon version takes effect at once.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources

from aiohttp import web

from .bodies import ApiError, json_response
from .contract import CERTIFICATE_WARN_DAYS, days_left
from .routes import rule
from .schemas import CertificateDays, Certificates

CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}
INDEX = "index.html"

# Only this daemon: no inline script or style, no other origin, no framing, no <base> tricks.
HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
        "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-cache",
}


@dataclass(frozen=True, slots=True)
class Asset:
    body: bytes
    content_type: str
    etag: str


def _load_assets() -> dict[str, Asset]:
    assets: dict[str, Asset] = {}
    for entry in (resources.files(__package__) / "ui").iterdir():
        suffix = "." + entry.name.rsplit(".", 1)[-1] if "." in entry.name else ""
        if suffix not in CONTENT_TYPES or not entry.is_file():
            continue  # only what the page serves; nothing else in the folder is published
        body = entry.read_bytes()
        etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
        assets[entry.name] = Asset(body, CONTENT_TYPES[suffix], etag)
    if INDEX not in assets:
        raise RuntimeError(f"the package lacks ui/{INDEX}: the daemon was installed without its page")
    return assets


ASSETS = _load_assets()

page_routes = web.RouteTableDef()  # guarded like every route (app.py), each handler's rule declared below


def _answer(request: web.Request, asset: Asset) -> web.Response:
    headers = {**HEADERS, "ETag": asset.etag}
    if request.headers.get("If-None-Match") == asset.etag:
        return web.Response(status=304, headers=headers)
    return web.Response(body=asset.body, headers={**headers, "Content-Type": asset.content_type})


@page_routes.get("/")
@rule(auth="none")
async def cluster_page(request: web.Request) -> web.Response:
    return _answer(request, ASSETS[INDEX])


@page_routes.get("/ui/{name}")
@rule(auth="none")
async def ui_file(request: web.Request) -> web.Response:
    asset = ASSETS.get(request.match_info["name"])
    if asset is None:
        raise ApiError(404, "NOT_FOUND", "no such file under /ui/")
    return _answer(request, asset)


# --- the days left on the certificates ------------------------------------------------------------------

# tls.ServerTls.expiry (certificate label -> not-after, unix seconds), or None on plain HTTP; app.py sets it.
CERTIFICATE_EXPIRY = web.AppKey("certificate_expiry", object)


def certificate_days(expiry: dict[str, float] | None, now_s: float) -> Certificates:
    """What GET /v2/certificates answers for `expiry` (ServerTls.expiry(), None on plain HTTP) at now_s."""
    rows = []
    for certificate, not_after_s in sorted((expiry or {}).items(), key=lambda item: item[0] != "server"):
        left = days_left(not_after_s, now_s)
        not_after = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(not_after_s))
        rows.append(CertificateDays(certificate, not_after, left, left < CERTIFICATE_WARN_DAYS))
    return Certificates(rows, CERTIFICATE_WARN_DAYS)


@page_routes.get("/v2/certificates")
@rule(auth="reader")
async def certificates(request: web.Request) -> web.Response:
    expiry: Callable[[], dict[str, float]] | None = request.app.get(CERTIFICATE_EXPIRY)
    return json_response(certificate_days(None if expiry is None else expiry(), time.time()))
