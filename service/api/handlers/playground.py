"""The playground page: base and instruct side by side (static files, no CDN)."""

from __future__ import annotations

from pathlib import Path

from fastapi.responses import FileResponse

STATIC_DIR = Path(__file__).resolve().parents[2] / "static"


async def favicon() -> FileResponse:
    """The gateway's icon (browsers ask for /favicon.ico on every page)."""
    return FileResponse(
        STATIC_DIR / "favicon.svg", media_type="image/svg+xml", headers={"Cache-Control": "max-age=86400"}
    )


async def playground() -> FileResponse:
    """The page; it asks for an API key itself when the gateway needs one."""
    return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})
