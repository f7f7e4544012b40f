"""A small in-process stand-in for the Hugging Face Hub, for tests that talk HTTP.

It speaks the part of the Hub API that della uses through the real ``huggingface_hub`` client:
model info (files and commit), the file tree, file resolve (HEAD, GET and byte ranges), repo and
branch creation, README validation, preupload (every file "regular", so content goes inline in
the commit) and NDJSON commits. Every request is recorded, with the bytes each file download
served, so that tests can assert what was read, what arrived, and in how many commits.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

VALID_TOKEN = "hf_fakeTOKENfor_della_tests_0123456789"


class StandIn(bytes):
    """A safetensors file of a full-size model that holds only its header: it has the size of
    the whole file, and everything past the header reads as zeros. Plans read headers only,
    so a 0.5B or 70B model can be served without its gigabytes."""

    size: int

    def __new__(cls, header: bytes, size: int) -> StandIn:
        file = super().__new__(cls, header)
        file.size = size
        return file

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, key):
        if not isinstance(key, slice):
            raise TypeError("a stand-in file is read by byte ranges")
        start, stop, _ = key.indices(self.size)
        held = bytes.__len__(self)
        head = bytes.__getitem__(self, slice(start, min(stop, held)))
        return head + bytes(max(0, stop - max(start, held)))


@dataclass
class Commit:
    sha: str
    message: str
    files: dict[str, bytes]


@dataclass
class Repo:
    private: bool = False
    branches: dict[str, list[Commit]] = field(default_factory=lambda: {"main": []})
    tags: dict[str, str] = field(default_factory=dict)

    def commit(self, revision: str) -> Commit | None:
        if revision in self.branches:
            history = self.branches[revision]
            return history[-1] if history else None
        sha = self.tags.get(revision, revision)
        for history in self.branches.values():
            for commit in history:
                if commit.sha == sha:
                    return commit
        return None


@dataclass
class Request:
    method: str
    path: str
    range: str | None
    authorized: bool
    served_bytes: int = 0


class FakeHub:
    """The Hub's state (repos, commits) and the log of requests it answered."""

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.requests: list[Request] = []
        self.forbidden_orgs: set[str] = set()  # the valid token may not write there
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self.url = ""
        self.down = False

    # --- setting up ------------------------------------------------------------------------

    def add_model(self, repo_id: str, folder: Path, tag: str | None = None, **kw) -> str:
        """Commit every file of ``folder`` to ``repo_id``'s main branch; return the commit."""
        files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*")}
        files = {name: data for name, data in files.items() if (folder / name).is_file()}
        repo = self.repos.setdefault(repo_id, Repo(**kw))
        sha = self._commit(repo, "main", f"add {folder.name}", files)
        if tag:
            repo.tags[tag] = sha
        return sha

    def add_files(self, repo_id: str, files: dict[str, bytes], message: str = "add") -> str:
        """Commit ``files`` (name -> content, ``StandIn`` for header-only weights) to
        ``repo_id``'s main branch; return the commit."""
        return self._commit(self.repos.setdefault(repo_id, Repo()), "main", message, files)

    def _commit(self, repo: Repo, branch: str, message: str, files: dict[str, bytes]) -> str:
        history = repo.branches.setdefault(branch, [])
        previous = dict(history[-1].files) if history else {}
        previous.update(files)
        seed = f"{len(history)}{branch}{message}{sorted(previous)}".encode()
        sha = hashlib.sha1(seed + b"".join(previous[k] for k in sorted(previous))).hexdigest()
        history.append(Commit(sha, message, previous))
        return sha

    # --- what happened -----------------------------------------------------------------------

    def served(self, suffix: str) -> int:
        """Bytes of file content served for paths ending with ``suffix``."""
        return sum(r.served_bytes for r in self.requests if r.path.endswith(suffix))

    def commits(self, repo_id: str, branch: str = "main") -> list[Commit]:
        return self.repos[repo_id].branches.get(branch, [])

    # --- serving -----------------------------------------------------------------------------

    def start(self) -> str:
        hub = self

        class Handler(_Handler):
            fake = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        return self.url

    def stop(self) -> None:
        """Go away like a network that is down: refuse new connections and drop kept-alive
        ones without an answer."""
        self.down = True
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


_REPO = r"(?P<repo>[^/]+/[^/]+)"
_ROUTES = [
    ("GET", re.compile(rf"^/api/models/{_REPO}(?:/revision/(?P<rev>[^/]+))?$"), "info"),
    ("GET", re.compile(rf"^/api/models/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?$"), "tree"),
    ("HEAD", re.compile(rf"^/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)$"), "resolve"),
    ("GET", re.compile(rf"^/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)$"), "resolve"),
    ("POST", re.compile(r"^/api/repos/create$"), "create"),
    ("POST", re.compile(r"^/api/validate-yaml$"), "validate"),
    ("POST", re.compile(rf"^/api/models/{_REPO}/branch/(?P<rev>[^/]+)$"), "branch"),
    ("POST", re.compile(rf"^/api/models/{_REPO}/preupload/(?P<rev>[^/]+)$"), "preupload"),
    ("POST", re.compile(rf"^/api/models/{_REPO}/commit/(?P<rev>[^/]+)$"), "commit"),
]


class _Handler(BaseHTTPRequestHandler):
    fake: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # quiet: the tests read FakeHub.requests instead
        pass

    def do_GET(self):
        self._route("GET")

    def do_HEAD(self):
        self._route("HEAD")

    def do_POST(self):
        self._route("POST")

    def _route(self, method: str) -> None:
        if self.fake.down:
            self.close_connection = True
            return
        path = urlsplit(self.path).path
        authorized = self.headers.get("Authorization") == f"Bearer {VALID_TOKEN}"
        self.record = Request(method, unquote(path), self.headers.get("Range"), authorized)
        with self.fake._lock:
            self.fake.requests.append(self.record)
        length = int(self.headers.get("Content-Length") or 0)
        self.body = self.rfile.read(length) if length else b""
        for verb, pattern, name in _ROUTES:
            match = pattern.match(path)
            if verb == method and match:
                params = {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
                with self.fake._lock:
                    getattr(self, f"_{name}")(**params)
                return
        self._error(404, "EntryNotFound", f"no route for {method} {path}")

    # --- responses -----------------------------------------------------------------------

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None) -> None:
        self.send_response(status)
        headers = {"Content-Length": str(len(body)), **(headers or {})}
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, value, status: int = 200) -> None:
        self._send(status, json.dumps(value).encode(), {"Content-Type": "application/json"})

    def _error(self, status: int, code: str, message: str) -> None:
        body = json.dumps({"error": message}).encode()
        self._send(status, body, {"Content-Type": "application/json", "X-Error-Code": code})

    def _repo(self, repo: str) -> Repo | None:
        found = self.fake.repos.get(repo)
        if found is None or (found.private and not self.record.authorized):
            self._error(404, "RepoNotFound", f"Repository {repo} not found")
            return None
        return found

    def _revision(self, repo: str, rev: str) -> tuple[Repo, Commit] | None:
        found = self._repo(repo)
        if found is None:
            return None
        commit = found.commit(rev)
        if commit is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
            return None
        return found, commit

    # --- routes --------------------------------------------------------------------------

    def _info(self, repo: str, rev: str = "main") -> None:
        resolved = self._revision(repo, rev)
        if resolved:
            found, commit = resolved
            self._json(
                {
                    "id": repo,
                    "modelId": repo,
                    "sha": commit.sha,
                    "private": found.private,
                    "siblings": [{"rfilename": name} for name in sorted(commit.files)],
                }
            )

    def _tree(self, repo: str, rev: str, path: str = "") -> None:
        resolved = self._revision(repo, rev)
        if resolved:
            files = resolved[1].files
            self._json(
                [
                    {
                        "type": "file",
                        "oid": hashlib.sha1(data).hexdigest(),
                        "size": len(data),
                        "path": name,
                    }
                    for name, data in sorted(files.items())
                    if name.startswith(path)
                ]
            )

    def _resolve(self, repo: str, rev: str, path: str) -> None:
        resolved = self._revision(repo, rev)
        if not resolved:
            return
        data = resolved[1].files.get(path)
        if data is None:
            self._error(404, "EntryNotFound", f"{path} does not exist at {rev}")
            return
        headers = {"X-Repo-Commit": resolved[1].sha, "ETag": f'"{hashlib.sha1(data).hexdigest()}"'}
        status, body = 200, data
        span = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range") or "")
        if span:
            start = int(span.group(1))
            stop = int(span.group(2)) + 1 if span.group(2) else len(data)
            status, body = 206, data[start:stop]
            headers["Content-Range"] = f"bytes {start}-{start + len(body) - 1}/{len(data)}"
        if self.command == "GET":
            self.record.served_bytes = len(body)
        self._send(status, body, headers)

    def _writable(self, repo: str) -> bool:
        if not self.record.authorized:
            self._error(401, "Unauthorized", "Invalid credentials in Authorization header")
            return False
        if repo.split("/")[0] in self.fake.forbidden_orgs:
            self._error(403, "Forbidden", f"You don't have the rights to write to {repo}")
            return False
        return True

    def _create(self) -> None:
        payload = json.loads(self.body)
        repo = f"{payload['organization']}/{payload['name']}"
        if not self._writable(repo):
            return
        if repo in self.fake.repos:
            self._error(409, "Conflict", "You already created this model repo")
            return
        self.fake.repos[repo] = Repo(private=payload.get("visibility") == "private")
        host = self.headers.get("Host")
        self._json({"url": f"http://{host}/{repo}", "name": repo})

    def _validate(self) -> None:
        self._json({"errors": [], "warnings": []})

    def _branch(self, repo: str, rev: str) -> None:
        found = self._repo(repo)
        if found is None or not self._writable(repo):
            return
        if rev in found.branches:
            self._error(409, "Conflict", f"Branch {rev} already exists")
            return
        found.branches[rev] = list(found.branches["main"])
        self._json({})

    def _preupload(self, repo: str, rev: str) -> None:
        if self._repo(repo) is None or not self._writable(repo):
            return
        files = json.loads(self.body)["files"]
        self._json(
            {
                "files": [
                    {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                    for f in files
                ]
            }
        )

    def _commit(self, repo: str, rev: str) -> None:
        found = self._repo(repo)
        if found is None or not self._writable(repo):
            return
        if rev not in found.branches:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
            return
        lines = [json.loads(line) for line in self.body.splitlines() if line.strip()]
        header = next(item["value"] for item in lines if item["key"] == "header")
        files = {
            item["value"]["path"]: base64.b64decode(item["value"]["content"])
            for item in lines
            if item["key"] == "file"
        }
        if any(item["key"] not in ("header", "file") for item in lines):
            self._error(400, "BadRequest", "only inline files are supported by this fake")
            return
        sha = self.fake._commit(found, rev, header["summary"], files)
        host = self.headers.get("Host")
        self._json(
            {
                "commitUrl": f"http://{host}/{repo}/commit/{sha}",
                "commitOid": sha,
                "pullRequestUrl": None,
            }
        )
