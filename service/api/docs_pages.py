"""The interactive API pages, /docs (Swagger UI) and /redoc, served with their scripts from this
process: FastAPI's defaults load them from a CDN, a blank page on a machine without internet. The
assets come from the `fastapi-offline` package (MIT: Swagger UI and ReDoc's own bundles); the pages
are FastAPI's own HTML pointed at them. They, and the schema they read, hold no secret, so they are
open even with API keys (trying a request from them still needs a key)."""

from __future__ import annotations

from pathlib import Path

import fastapi_offline
from fastapi import FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.staticfiles import StaticFiles
from starlette.responses import HTMLResponse

ASSETS_URL = "/static/docs"  # under /static/: open like the playground's files
ASSETS_DIR = Path(fastapi_offline.__file__).parent / "static"
OPENAPI_URL = "/openapi.json"
FAVICON_URL = "/favicon.ico"
DOCS_PATHS = frozenset({"/docs", "/redoc", OPENAPI_URL})


def install_docs(app: FastAPI) -> None:
    """/docs and /redoc with self-hosted scripts (create the app with docs_url=redoc_url=None)."""
    title = app.title

    async def swagger() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=OPENAPI_URL,
            title=f"{title}: API",
            swagger_js_url=f"{ASSETS_URL}/swagger-ui-bundle.js",
            swagger_css_url=f"{ASSETS_URL}/swagger-ui.css",
            swagger_favicon_url=FAVICON_URL,
        )

    async def redoc() -> HTMLResponse:
        return get_redoc_html(
            openapi_url=OPENAPI_URL,
            title=f"{title}: API",
            redoc_js_url=f"{ASSETS_URL}/redoc.standalone.js",
            redoc_favicon_url=FAVICON_URL,
            with_google_fonts=False,
        )

    app.add_api_route("/docs", swagger, methods=["GET"], include_in_schema=False)
    app.add_api_route("/redoc", redoc, methods=["GET"], include_in_schema=False)
    # Before the playground's /static mount, which would otherwise take these paths.
    app.mount(ASSETS_URL, StaticFiles(directory=ASSETS_DIR), name="docs-assets")
