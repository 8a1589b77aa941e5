"""The pipeline's AsyncAPI document (`events/asyncapi.json`, generated from the stages) and its viewer.

Read-only: unlike FastStream's AsgiFastStream docs route, there is no `POST .../try` endpoint that would
publish to the real broker. The viewer loads AsyncAPI's web component from a CDN (the JSON is always
served locally). The HTTP routes' own OpenAPI page is FastAPI's `/docs` (`/openapi.json`).
"""

from __future__ import annotations

import html
import json
from typing import Any

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

from handlers.bridge.asyncapi import SPEC_PATH

router = APIRouter(tags=["docs"], include_in_schema=False)

JS = "https://unpkg.com/@asyncapi/react-component@3.1.5/browser/standalone/index.js"
CSS = "https://unpkg.com/@asyncapi/react-component@3.1.5/styles/default.min.css"


def spec() -> dict[str, Any]:
    return json.loads(SPEC_PATH.read_text())


@router.get("/asyncapi.json")
async def asyncapi_json() -> dict[str, Any]:
    return spec()


@router.get("/asyncapi", response_class=HTMLResponse)
async def asyncapi_page() -> str:
    doc = spec()
    config = {"schema": doc, "config": {"show": {"sidebar": True}}}
    data = json.dumps(config).replace("</", "<\\/")
    return f"""<!DOCTYPE html>
<html><head><title>{html.escape(doc.get("info", {}).get("title", "CodeTune"))} AsyncAPI</title>
<link rel="stylesheet" href="{CSS}"></head>
<body><div id="asyncapi"></div><script src="{JS}"></script>
<script>AsyncApiStandalone.render({data}, document.getElementById("asyncapi"));</script>
<noscript>The raw document is at <a href="/asyncapi.json">/asyncapi.json</a>.</noscript></body></html>"""
