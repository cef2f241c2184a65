"""An in-memory, Hub-compatible HTTP server on 127.0.0.1 for offline upload/download tests.

It implements what huggingface_hub 2.4, peft and transformers call for a model repo: create_repo, preupload and
commit (regular, non-LFS uploads: the bytes travel base64-encoded in the NDJSON commit), validate-yaml, the tree
listing behind list_repo_files, and HEAD/GET of ``/<repo>/resolve/<revision>/<path>``. Write calls need the bearer
token it was created with (401 otherwise). Set HF_ENDPOINT *before* importing huggingface_hub, transformers or
peft: huggingface_hub reads it at import time.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlparse

import yaml


class FakeHub:
    """``with FakeHub(token) as hub: ...`` serves at ``hub.endpoint``; ``hub.repos[repo_id]`` maps paths to bytes."""

    def __init__(self, token: str = "hf_test_token"):
        self.token = token
        self.repos: dict[str, dict[str, bytes]] = {}
        self.commits: dict[str, list[dict]] = {}
        self.requests: list[str] = []
        self.reject_next_commit = False
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> FakeHub:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def revision(self, repo_id: str) -> str:
        return hashlib.sha1(f"{repo_id}:{len(self.commits.get(repo_id, []))}".encode()).hexdigest()


def _handler(hub: FakeHub):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _json(self, code: int, payload, headers: dict | None = None) -> None:
            body = json.dumps(payload).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(body)

        def _body(self) -> bytes:
            length = int(self.headers.get("Content-Length", 0))
            return self.rfile.read(length) if length else b""

        def _authorised(self) -> bool:
            if self.headers.get("Authorization") == f"Bearer {hub.token}":
                return True
            self._json(401, {"error": "Invalid credentials in Authorization header"})
            return False

        def do_POST(self):  # noqa: N802
            path = urlparse(self.path).path
            hub.requests.append(f"POST {path}")
            body = self._body()
            if path == "/api/validate-yaml":
                front = re.match(r"^---\n(.*?)\n---", json.loads(body)["content"], re.S)
                yaml.safe_load(front.group(1)) if front else None  # raises on invalid YAML, as the Hub would
                return self._json(200, {"errors": [], "warnings": []})
            if not self._authorised():
                return None
            if path == "/api/repos/create":
                data = json.loads(body)
                repo_id = f"{data['organization']}/{data['name']}" if data.get("organization") else data["name"]
                hub.repos.setdefault(repo_id, {})
                hub.commits.setdefault(repo_id, [])
                return self._json(200, {"url": f"{hub.endpoint}/{repo_id}", "name": repo_id, "id": repo_id})
            match = re.fullmatch(r"/api/models/(.+?/.+?)/preupload/(.+)", path)
            if match:
                files = [
                    {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                    for f in json.loads(body)["files"]
                ]
                return self._json(200, {"files": files, "commitOid": hub.revision(match.group(1))})
            match = re.fullmatch(r"/api/models/(.+?/.+?)/commit/(.+)", path)
            if match:
                repo_id = match.group(1)
                if repo_id not in hub.repos:
                    return self._json(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
                if hub.reject_next_commit:
                    hub.reject_next_commit = False
                    # a 4xx: huggingface_hub retries 5xx errors, and a retried commit would land
                    return self._json(422, {"error": "Commit rejected: a pre-receive check failed"})
                lines = [json.loads(line) for line in body.splitlines() if line.strip()]
                staged = dict(hub.repos[repo_id])
                for item in lines[1:]:
                    if item["key"] == "file":
                        staged[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                    elif item["key"] in ("deletedFile", "deletedFolder"):
                        staged.pop(item["value"]["path"], None)
                    else:
                        return self._json(400, {"error": f"unsupported operation {item['key']}"})
                hub.repos[repo_id] = staged  # all or nothing, like a git commit
                hub.commits[repo_id].append({"summary": lines[0]["value"].get("summary"), "files": sorted(staged)})
                oid = hub.revision(repo_id)
                return self._json(
                    200,
                    {"commitUrl": f"{hub.endpoint}/{repo_id}/commit/{oid}", "commitOid": oid, "pullRequestUrl": None},
                )
            return self._json(404, {"error": f"unhandled {path}"})

        def _tree(self, repo_id: str, prefix: str, recursive: bool):
            files = hub.repos[repo_id]
            prefix = prefix.strip("/")
            entries, folders = [], set()
            for path, data in sorted(files.items()):
                if prefix and not path.startswith(prefix + "/"):
                    continue
                rest = path[len(prefix) + 1 :] if prefix else path
                if "/" in rest and not recursive:
                    folders.add((prefix + "/" if prefix else "") + rest.split("/")[0])
                    continue
                if recursive:
                    parts = path.split("/")[:-1]
                    folders.update("/".join(parts[: i + 1]) for i in range(len(parts)))
                entries.append(
                    {"type": "file", "path": path, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                )
            entries += [
                {"type": "directory", "path": folder, "oid": "0" * 40, "size": 0} for folder in sorted(folders)
            ]
            return self._json(200, entries)

        def _get_or_head(self, head: bool):
            parsed = urlparse(self.path)
            path = unquote(parsed.path)
            hub.requests.append(f"{'HEAD' if head else 'GET'} {path}")
            match = re.fullmatch(r"/api/models/(.+?/.+?)/tree/([^/]+)(/.*)?", path)
            if match:
                repo_id, _, prefix = match.groups()
                if repo_id not in hub.repos:
                    return self._json(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
                recursive = parse_qs(parsed.query).get("recursive", ["false"])[0].lower() == "true"
                return self._tree(repo_id, prefix or "", recursive)
            match = re.fullmatch(r"/api/models/(.+?/.+?)(/revision/[^/]+)?", path)
            if match:
                repo_id = match.group(1)
                if repo_id not in hub.repos:
                    return self._json(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
                siblings = [{"rfilename": p} for p in sorted(hub.repos[repo_id])]
                return self._json(
                    200,
                    {
                        "id": repo_id,
                        "modelId": repo_id,
                        "sha": hub.revision(repo_id),
                        "siblings": siblings,
                        "private": False,
                    },
                )
            match = re.fullmatch(r"/(.+?/.+?)/resolve/([^/]+)/(.+)", path)
            if not match:
                return self._json(404, {"error": "not found"})
            repo_id, _, filename = match.groups()
            if repo_id not in hub.repos:
                return self._json(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
            data = hub.repos[repo_id].get(filename)
            if data is None:
                return self._json(
                    404,
                    {"error": "Entry not found"},
                    {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": hub.revision(repo_id)},
                )
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
            self.send_header("X-Repo-Commit", hub.revision(repo_id))
            self.end_headers()
            if not head:
                self.wfile.write(data)
            return None

        def do_HEAD(self):  # noqa: N802
            self._get_or_head(head=True)

        def do_GET(self):  # noqa: N802
            self._get_or_head(head=False)

    return Handler
