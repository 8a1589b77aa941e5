"""A Hugging Face Hub STAND-IN for push and search tests (NOT the hub): the few endpoints `HfApi.create_repo`
and `upload_folder` use when every file is committed inline ("regular" upload mode), with bearer-token
checks, and `GET /api/models` (what `HfApi.list_models` calls) over a small catalogue filtered by
`pipeline_tag` and `search` and cut at `limit`. It records what was committed and how often it was searched
so tests can assert on them."""

from __future__ import annotations

import base64
import contextlib
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class HubStandin:
    def __init__(self, token: str) -> None:
        self.token = token
        self.repos: dict[str, dict[str, Any]] = {}
        self.commits: list[dict[str, Any]] = []
        self.searches = 0
        self.catalogue: list[dict[str, Any]] = [
            {"id": "HuggingFaceTB/SmolLM2-135M-Instruct", "downloads": 900_000, "pipeline_tag": "text-generation",
             "tags": ["transformers", "safetensors", "llama", "text-generation"]},
            {"id": "Qwen/Qwen2.5-0.5B-Instruct", "downloads": 700_000, "pipeline_tag": "text-generation",
             "tags": ["transformers", "qwen2", "text-generation"]},
            {"id": "codetune-test/tiny-llama", "downloads": 3, "pipeline_tag": "text-generation",
             "tags": ["llama", "text-generation"]},
            {"id": "openai/whisper-tiny", "downloads": 800_000, "pipeline_tag": "automatic-speech-recognition",
             "tags": ["whisper"]},
        ]


def _handler(hub: HubStandin, base: list[str]) -> type[BaseHTTPRequestHandler]:
    class H(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def _send(self, code: int, obj: Any) -> None:
            body = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            from urllib.parse import parse_qs, urlsplit

            url = urlsplit(self.path)
            if url.path.rstrip("/") != "/api/models":
                self._send(404, {"error": f"stand-in: no route {self.path}"})
                return
            hub.searches += 1
            q = {k: v[0] for k, v in parse_qs(url.query).items()}
            rows = [m for m in hub.catalogue if not q.get("pipeline_tag") or m["pipeline_tag"] == q["pipeline_tag"]]
            rows = [m for m in rows if q.get("search", "").lower() in m["id"].lower()]
            rows.sort(key=lambda m: -m["downloads"])
            self._send(200, [{**m, "modelId": m["id"]} for m in rows[: int(q.get("limit") or 1000)]])

        def do_POST(self) -> None:
            if self.headers.get("Authorization") != f"Bearer {hub.token}":
                self._send(401, {"error": "Invalid credentials in Authorization header"})
                return
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            parts = self.path.split("?")[0].strip("/").split("/")
            if parts[:3] == ["api", "repos", "create"]:
                data = json.loads(raw)
                repo = f"{data.get('organization') or 'me'}/{data['name']}" if "/" not in data["name"] else data["name"]
                private = data.get("private", data.get("visibility") == "private")
                hub.repos.setdefault(repo, {"private": private, "files": {}})
                self._send(200, {"url": f"{base[0]}/{repo}", "name": repo})
            elif parts[:2] == ["api", "validate-yaml"]:
                self._send(200, {"errors": [], "warnings": []})
            elif parts[:2] == ["api", "models"] and "preupload" in parts:
                files = json.loads(raw)["files"]
                self._send(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                           for f in files], "commitOid": "0" * 40})
            elif parts[:2] == ["api", "models"] and "commit" in parts:
                repo = "/".join(parts[2:parts.index("commit")])
                lines = [json.loads(line) for line in raw.decode().splitlines() if line.strip()]
                files = {}
                for line in lines:
                    if line.get("key") == "file":
                        v = line["value"]
                        files[v["path"]] = base64.b64decode(v["content"]) if v.get("encoding") == "base64" else v
                hub.repos.setdefault(repo, {"files": {}})["files"].update(files)
                hub.commits.append({"repo": repo, "files": sorted(files)})
                self._send(200, {"commitUrl": f"{base[0]}/{repo}/commit/{'1' * 40}", "commitOid": "1" * 40,
                                 "pullRequestUrl": None})
            else:
                self._send(404, {"error": f"stand-in: no route {self.path}"})

    return H


@contextlib.contextmanager
def serve_hub(token: str) -> Iterator[tuple[str, HubStandin]]:
    hub = HubStandin(token)
    base: list[str] = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(hub, base))
    base.append(f"http://127.0.0.1:{server.server_address[1]}")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield base[0], hub
    finally:
        server.shutdown()
