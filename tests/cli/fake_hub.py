"""A local stand-in for the Hugging Face hub: the HTTP endpoints `huggingface_hub.snapshot_download` calls.

    GET  /api/models/<owner>/<name>[/revision/<rev>]     model info (its `sha` is the commit to download)
    GET  /api/models/<owner>/<name>/tree/<commit>         the file list (recursive, one page)
    HEAD /<owner>/<name>/resolve/<commit>/<path>          X-Repo-Commit, ETag, Content-Length
    GET  /<owner>/<name>/resolve/<commit>/<path>          the bytes; `Range: bytes=N-` answers 206 with the rest

Errors use the hub's `X-Error-Code` header: a gated repo answers 401 `GatedRepo` without the right token, an
unknown repo 404 `RepoNotFound`. A file in `drop_once` is cut off (the connection closes) halfway through its
first GET, as a dropped network would; `fail_once` answers 500 to its first GET. Every request is logged in
`requests` as (method, path, Range header) for the tests to check what was fetched.
"""

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@dataclass
class FakeRepo:
    files: dict[str, bytes]
    gated_token: str | None = None  # set: the repo is gated and only this token may read it


@dataclass
class FakeHub:
    repos: dict[str, FakeRepo]
    drop_once: set[str] = field(default_factory=set)  # "<repo>/<path>" cut off halfway through its first GET
    fail_once: set[str] = field(default_factory=set)  # "<repo>/<path>" answers 500 to its first GET
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def gets(self, path_suffix: str) -> list[str | None]:
        """The Range headers of the GETs of files whose URL ends with `path_suffix`."""
        return [rng for method, path, rng in self.requests if method == "GET" and path.endswith("/" + path_suffix)]


def _handler(hub: FakeHub):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # keep pytest output clean
            pass

        def do_GET(self):
            self._serve(body=True)

        def do_HEAD(self):
            self._serve(body=False)

        def _error(self, status: int, code: str, message: str) -> None:
            self.send_response(status)
            self.send_header("X-Error-Code", code)
            self.send_header("X-Error-Message", message)
            self.send_header("Content-Type", "application/json")
            payload = json.dumps({"error": message}).encode()
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)

        def _json(self, data) -> None:
            payload = json.dumps(data).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def _repo(self, repo_id: str) -> FakeRepo | None:
            repo = hub.repos.get(repo_id)
            if repo is None:
                self._error(404, "RepoNotFound", "Repository not found")
                return None
            if repo.gated_token is not None and self.headers.get("Authorization") != f"Bearer {repo.gated_token}":
                self._error(401, "GatedRepo", "Access to this model is restricted: accept the license")
                return None
            return repo

        def _serve(self, body: bool) -> None:
            path = unquote(urlsplit(self.path).path)
            with hub.lock:
                hub.requests.append((self.command, path, self.headers.get("Range")))
            if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/(.+))?", path):
                if (repo := self._repo(m[1])) is not None:
                    siblings = [{"rfilename": name} for name in repo.files]
                    self._json({"id": m[1], "sha": COMMIT, "siblings": siblings, "private": False})
            elif m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)", path):
                if (repo := self._repo(m[1])) is not None:
                    self._json([{"type": "file", "path": name, "size": len(data),
                                 "oid": hashlib.sha1(data).hexdigest()} for name, data in repo.files.items()])
            elif m := re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path):
                if (repo := self._repo(m[1])) is not None:
                    if m[3] not in repo.files:
                        self._error(404, "EntryNotFound", "Entry not found")
                    else:
                        self._file(f"{m[1]}/{m[3]}", repo.files[m[3]], body)
            else:
                self._error(404, "RepoNotFound", "Not found")

        def _file(self, key: str, data: bytes, body: bool) -> None:
            start = 0
            if body and (rng := re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")):
                start = int(rng[1])
            with hub.lock:
                fail = body and key in hub.fail_once
                drop = body and key in hub.drop_once
                hub.fail_once.discard(key) if fail else hub.drop_once.discard(key) if drop else None
            if fail:
                self._error(500, "InternalError", "the fake hub failed this file once")
                return
            self.send_response(206 if start else 200)
            self.send_header("X-Repo-Commit", COMMIT)
            self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Length", str(len(data) - start))
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.end_headers()
            if not body:
                return
            if drop:  # half the promised bytes, then the connection closes: the client sees a cut-off body
                self.wfile.write(data[start:start + (len(data) - start) // 2])
                self.wfile.flush()
                self.close_connection = True
                return
            self.wfile.write(data[start:])

    return Handler


class FakeHubServer:
    """The fake hub on 127.0.0.1 at a free port, served by a daemon thread; a context manager that stops it."""

    def __init__(self, hub: FakeHub):
        self.hub = hub
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(hub))
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self) -> "FakeHubServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)
