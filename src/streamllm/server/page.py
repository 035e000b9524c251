"""The chat page at ``GET /``: four static files shipped with the package (no build step, nothing fetched from
elsewhere), served with a Content-Security-Policy that allows scripts, styles and requests from this origin only.
The page talks to the server through the same OpenAI endpoints and API key as any other client."""

from __future__ import annotations

from functools import cache
from importlib import resources

from fastapi import APIRouter
from starlette.responses import Response

FILES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/ui/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/ui/recalls.js": ("recalls.js", "text/javascript; charset=utf-8"),
    "/ui/style.css": ("style.css", "text/css; charset=utf-8"),
}
PATHS = frozenset(FILES) | {"/favicon.ico"}  # served without an API key: the page asks for the key itself

# No inline script or style, nothing from another origin, no framing, no form posts: model text that slipped
# into the page as markup still could not run.
POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
HEADERS = {
    "Content-Security-Policy": POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


@cache
def _read(name: str) -> bytes:
    return resources.files(__package__).joinpath("static", name).read_bytes()


def _endpoint(name: str, media_type: str):
    async def serve() -> Response:
        return Response(_read(name), media_type=media_type, headers=HEADERS)

    return serve


def router() -> APIRouter:
    r = APIRouter()
    for path, (name, media_type) in FILES.items():
        r.add_api_route(path, _endpoint(name, media_type), methods=["GET"], include_in_schema=False)
    r.add_api_route("/favicon.ico", _no_icon, methods=["GET"], include_in_schema=False)
    return r


async def _no_icon() -> Response:
    return Response(status_code=204)
