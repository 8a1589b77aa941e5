"""The bridge's documentation pages, served with no internet: `/docs` (Swagger UI over `/openapi.json`)
and `/asyncapi` (the pipeline's AsyncAPI document, `events/asyncapi.json`, generated from the stages).

Both pages load their scripts and styles from installed packages, mounted under `/docs/assets` (Swagger
UI from `swagger-ui-bundle-v2`) and `/asyncapi/assets` (the `<asyncapi-viewer>` web component from
`asyncapi-viewer`), never from a CDN, so they work on an offline host. Read-only: unlike FastStream's
AsgiFastStream docs route, there is no `POST .../try` endpoint that would publish to the real broker.
"""

from __future__ import annotations

import html
import importlib.util
import json
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from swagger_ui_bundle import swagger_ui_path

from handlers.bridge.asyncapi import SPEC_PATH

router = APIRouter(tags=["docs"], include_in_schema=False)

SWAGGER_ASSETS = "/docs/assets"
ASYNCAPI_ASSETS = "/asyncapi/assets"


def _viewer_dir() -> Path:
    """asyncapi-viewer's packaged bundle (found without importing the package, which imports Markdown)."""
    spec = importlib.util.find_spec("asyncapi_viewer")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("asyncapi-viewer is not installed (pip install asyncapi-viewer)")
    return Path(next(iter(spec.submodule_search_locations))) / "static"


def spec() -> dict[str, Any]:
    return json.loads(SPEC_PATH.read_text())


@router.get("/docs")
async def swagger_ui() -> HTMLResponse:
    return get_swagger_ui_html(
        openapi_url="/openapi.json", title="CodeTune bridge - Swagger UI",
        swagger_js_url=f"{SWAGGER_ASSETS}/swagger-ui-bundle.js", swagger_css_url=f"{SWAGGER_ASSETS}/swagger-ui.css",
        swagger_favicon_url=f"{SWAGGER_ASSETS}/favicon-32x32.png",
    )


@router.get("/asyncapi.json")
async def asyncapi_json() -> dict[str, Any]:
    return spec()


@router.get("/asyncapi", response_class=HTMLResponse)
async def asyncapi_page() -> str:
    title = html.escape(spec().get("info", {}).get("title", "CodeTune"))
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{title} AsyncAPI</title>
<link rel="stylesheet" href="{ASYNCAPI_ASSETS}/asyncapi-theme.css">
<script type="module" src="{ASYNCAPI_ASSETS}/asyncapi-viewer.js"></script></head>
<body><asyncapi-viewer src="/asyncapi.json" sidebar></asyncapi-viewer>
<noscript>The raw document is at <a href="/asyncapi.json">/asyncapi.json</a>.</noscript></body></html>"""


def install(app: FastAPI) -> None:
    """The docs routes and their assets (the app must be created with `docs_url=None, redoc_url=None`)."""
    app.include_router(router)
    app.mount(SWAGGER_ASSETS, StaticFiles(directory=swagger_ui_path), name="swagger-ui-assets")
    app.mount(ASYNCAPI_ASSETS, StaticFiles(directory=_viewer_dir()), name="asyncapi-viewer-assets")
