"""A Hub-compatible HTTP server on 127.0.0.1, to try ``push_to_hub`` and loading from the Hub with no network.

    python -m hf_clip_forget.hub.local_hub ./local-hub --port 8765 --token hf_local

serves the folder ``./local-hub`` (one sub-folder per repo, ``namespace/name/``, created by the uploads and read back
at the next start) until Ctrl-C. Point huggingface_hub at it in the shell that pushes or loads, *before* Python
starts (huggingface_hub reads these variables when it is imported)::

    export HF_ENDPOINT=http://127.0.0.1:8765 HF_TOKEN=hf_local
    unset HF_HUB_OFFLINE TRANSFORMERS_OFFLINE      # offline mode refuses every request, to a local server too

It implements what huggingface_hub 2.4, peft and transformers call for a model repo: create_repo, preupload and
commit (regular, non-LFS uploads: the bytes travel base64-encoded in the NDJSON commit), validate-yaml, the tree
listing behind ``list_repo_files``, model info, and HEAD/GET of ``/<repo>/resolve/<revision>/<path>``. Write calls
need the bearer token it was started with (HTTP 401 otherwise). No history, branches, pull requests or LFS: it is a
test double, not a Hub. The test suite runs one in memory (``LocalHub()``, ``tests/fake_hub.py``).

This module imports only the standard library and PyYAML, and nothing of this package, so that it can be loaded
before huggingface_hub is imported (the tests do, to set ``HF_ENDPOINT`` first).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlparse

import yaml


#: A repo id the server accepts: ``namespace/name`` of the characters the Hub allows (never ``..``).
_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}")


class LocalHub:
    """``with LocalHub(token) as hub: ...`` serves at ``hub.endpoint``; ``hub.repos[repo_id]`` maps paths to bytes.

    Args:
        token: the bearer token write calls must carry.
        directory: a folder to keep the repos in (``directory/namespace/name/<files>``): read when the server is
            created, written after every commit. ``None`` (default): in memory only.
        host, port: where to listen; port 0 (default) picks a free one.
    """

    def __init__(
        self, token: str = "hf_test_token", directory: str | None = None, host: str = "127.0.0.1", port: int = 0
    ):
        self.token = token
        self.directory = os.path.abspath(directory) if directory is not None else None
        self.repos: dict[str, dict[str, bytes]] = {}
        self.commits: dict[str, list[dict]] = {}
        self.requests: list[str] = []
        self.reject_next_commit = False
        if self.directory is not None:
            self._load(self.directory)
        self._server = ThreadingHTTPServer((host, port), _handler(self))
        self.endpoint = f"http://{host}:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> LocalHub:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def serve_forever(self) -> None:
        """Serve in this thread until interrupted (the command line's loop)."""
        try:
            self._server.serve_forever()
        finally:
            self._server.server_close()

    def revision(self, repo_id: str) -> str:
        return hashlib.sha1(f"{repo_id}:{len(self.commits.get(repo_id, []))}".encode()).hexdigest()

    def _load(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        for namespace in sorted(os.listdir(directory)):
            if not os.path.isdir(os.path.join(directory, namespace)):
                continue
            for name in sorted(os.listdir(os.path.join(directory, namespace))):
                root, repo_id = os.path.join(directory, namespace, name), f"{namespace}/{name}"
                if not (os.path.isdir(root) and _REPO_ID.fullmatch(repo_id)):
                    continue
                files = {}
                for folder, _, names in os.walk(root):
                    for file in names:
                        path = os.path.join(folder, file)
                        with open(path, "rb") as handle:
                            files[os.path.relpath(path, root).replace(os.sep, "/")] = handle.read()
                self.repos[repo_id] = files
                self.commits[repo_id] = []

    def _store(self, repo_id: str, files: dict[str, bytes], removed: set[str]) -> None:
        """Write a committed repo into the directory (each file through a temporary name, then renamed)."""
        if self.directory is None:
            return
        root = os.path.join(self.directory, *repo_id.split("/"))
        for path in removed:
            target = os.path.join(root, *path.split("/"))
            if os.path.isfile(target):
                os.remove(target)
        for path, data in files.items():
            target = os.path.join(root, *path.split("/"))
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with open(target + ".partial", "wb") as handle:
                handle.write(data)
            os.replace(target + ".partial", target)


def _safe_path(path: str) -> bool:
    """A repo-relative file path: no absolute path, no ``..``, no empty or dot component."""
    parts = path.split("/")
    return bool(path) and "\\" not in path and all(part not in ("", ".", "..") for part in parts)


def _handler(hub: LocalHub):
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
                if not _REPO_ID.fullmatch(repo_id):
                    return self._json(400, {"error": f"invalid repo id {repo_id!r}: use 'namespace/name'"})
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
                return self._commit(match.group(1), body)
            return self._json(404, {"error": f"unhandled {path}"})

        def _commit(self, repo_id: str, body: bytes):
            if repo_id not in hub.repos:
                return self._json(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
            if hub.reject_next_commit:
                hub.reject_next_commit = False
                # a 4xx: huggingface_hub retries 5xx errors, and a retried commit would land
                return self._json(422, {"error": "Commit rejected: a pre-receive check failed"})
            lines = [json.loads(line) for line in body.splitlines() if line.strip()]
            staged = dict(hub.repos[repo_id])
            for item in lines[1:]:
                if item["key"] not in ("file", "deletedFile", "deletedFolder"):
                    return self._json(400, {"error": f"unsupported operation {item['key']}"})
                if not _safe_path(item["value"]["path"]):
                    return self._json(400, {"error": f"invalid path {item['value']['path']!r}"})
                if item["key"] == "file":
                    staged[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                else:
                    staged.pop(item["value"]["path"], None)
            removed = set(hub.repos[repo_id]) - set(staged)
            hub.repos[repo_id] = staged  # all or nothing, like a git commit
            hub._store(repo_id, staged, removed)
            hub.commits[repo_id].append({"summary": lines[0]["value"].get("summary"), "files": sorted(staged)})
            oid = hub.revision(repo_id)
            return self._json(
                200,
                {"commitUrl": f"{hub.endpoint}/{repo_id}/commit/{oid}", "commitOid": oid, "pullRequestUrl": None},
            )

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m hf_clip_forget.hub.local_hub",
        description="Serve a folder as a Hub on 127.0.0.1, to try push_to_hub and loading with no network.",
    )
    parser.add_argument("directory", help="the folder that holds the repos (namespace/name/...); created if missing")
    parser.add_argument("--port", type=int, default=8765, help="port to listen on (0: any free one; default 8765)")
    parser.add_argument("--token", default="hf_local", help="the token uploads must carry (default hf_local)")
    args = parser.parse_args(argv)
    hub = LocalHub(args.token, directory=args.directory, port=args.port)
    print(
        f"serving {hub.directory} as a Hub at {hub.endpoint} (Ctrl-C stops it); in the shell that pushes:", flush=True
    )
    print(
        f"  export HF_ENDPOINT={hub.endpoint} HF_TOKEN={args.token}; unset HF_HUB_OFFLINE TRANSFORMERS_OFFLINE",
        flush=True,
    )
    try:
        hub.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
