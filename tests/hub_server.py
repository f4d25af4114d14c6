"""A small, real Hugging Face Hub on 127.0.0.1 for tests: no mocks, the real ``huggingface_hub`` and
``datasets`` clients talk HTTP to it.

Repositories are folders on disk::

    <root>/datasets/<org>/<name>/<files>      dataset repos   (hf://datasets/org/name, load_dataset("org/name"))
    <root>/models/<org>/<name>/<files>        model repos     (HfApi().upload_folder, hf_hub_download)

Each repository has the branch ``main`` (the folder above) and the branches made with
``HfApi.create_branch`` (copies under ``<root>/.branches/<type>s/<repo_id>/<quoted branch>/``); a
commit to ``revision=<branch>`` changes that branch only, and reads with that revision serve its files.
A branch's commit sha is a hash of its files' contents, so it stays the same while the files do and
changes with every commit; a commit made through the API keeps the files it replaced, so an earlier
commit sha stays readable (``revision=<sha>``) until ``super_squash_history``. Routes (those ``huggingface_hub`` 2.x and
``datasets`` 5.x call; anything else is answered 404 and recorded in :attr:`HubServer.unhandled`):

- ``GET  /api/{models,datasets}/{org}/{name}[/revision/{rev}]`` repo info (``sha``, ``siblings``)
- ``GET  /api/{type}s/{org}/{name}/tree/{rev}[/{dir}]?recursive=&expand=`` file listing
- ``POST /api/{type}s/{org}/{name}/paths-info/{rev}`` (form ``paths``) file infos
- ``HEAD|GET /[datasets/]{org}/{name}/resolve/{rev}/{file}`` file metadata / bytes (``Range`` -> 206)
- ``POST /api/repos/create``, ``POST /api/{type}s/{org}/{name}/preupload/{rev}``,
  ``POST /api/{type}s/{org}/{name}/commit/{rev}`` (NDJSON, files sent base64 as "regular" blobs),
  ``POST /api/validate-yaml``
- ``POST /api/{type}s/{org}/{name}/super-squash/{branch}`` (``HfApi.super_squash_history``: earlier commits gone)
- ``POST|DELETE /api/{type}s/{org}/{name}/branch/{branch}`` (JSON ``startingPoint``; 409 when it exists),
  ``GET /api/{type}s/{org}/{name}/refs``

Every request records its ``Authorization`` header (:attr:`RequestRecord.authorization`); with
:attr:`HubServer.required_token` set, writes without ``Bearer <that token>`` are answered 401, and so
are reads of private repos (the visibility ``create_repo`` asked for: :meth:`HubServer.is_private`).

Errors carry the ``X-Error-Code`` header ``huggingface_hub`` maps to its exception types
(``RepoNotFound`` -> ``RepositoryNotFoundError``, ``RevisionNotFound``, ``EntryNotFound``).

Fault injection (thread-safe) per file path inside a repo (its ``resolve`` requests) or per URL path
("/api/datasets/org/name": that route) -- see
:meth:`HubServer.drop_connection`, :meth:`HubServer.fail_with`, :meth:`HubServer.stall`; and request
records (:meth:`HubServer.count`, :meth:`HubServer.requests`) to assert that retries happened.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import re
import shutil
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit

REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
TYPE_DIRS = {v: k for k, v in REPO_TYPES.items()}
LFS_PATTERNS = ("*.parquet", "*.arrow", "*.safetensors", "*.bin", "*.pt", "*.gz", "*.zst")
"""Files described like Git LFS files (``lfs`` in listings, ``X-Linked-Etag``/``X-Linked-Size`` on HEAD);
they are still served by the server itself (no redirect to a CDN)."""
SHA_RE = re.compile(r"^[0-9a-f]{40}$")


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Fault:
    """One injected failure rule for requests of one file (see ``HubServer`` methods)."""

    kind: str  # "drop" | "status" | "stall"
    times: int | None  # fire this many times (None: always)
    methods: tuple[str, ...] = ("GET",)
    repo: str | None = None  # "org/name" or None for any repo
    after_bytes: int | None = None  # drop/stall: body bytes sent first (None for stall: before the headers)
    status: int = 503
    retry_after: str | None = "0"
    seconds: float = 0.0
    fired: int = 0

    def matches(self, method: str, repo_id: str | None) -> bool:
        return method in self.methods and (self.repo is None or self.repo == repo_id) and (
            self.times is None or self.fired < self.times
        )


@dataclass
class RequestRecord:
    method: str
    path: str  # URL path as received (no query)
    repo_id: str | None = None
    file: str | None = None  # for resolve requests: path of the file inside the repo
    range: str | None = None
    status: int | None = None
    fault: str | None = None  # kind of fault injected into this request, if any
    time: float = field(default_factory=time.monotonic)
    authorization: str | None = None  # the Authorization header sent, if any


class _Repo:
    def __init__(self, server: HubServer, repo_type: str, repo_id: str):
        self.server = server
        self.type = repo_type
        self.id = repo_id
        self.dir = server.root / TYPE_DIRS[repo_type] / repo_id
        self.main_dir = self.dir
        self.branch = "main"  # the branch that dir holds (see select)

    def exists(self) -> bool:
        return self.main_dir.is_dir()

    def branch_dir(self, branch: str) -> Path:
        if branch == "main":
            return self.main_dir
        return self.server.root / ".branches" / TYPE_DIRS[self.type] / self.id / quote(branch, safe="")

    def branches(self) -> list[str]:
        """``main`` first, then the other branches in name order."""
        folder = self.server.root / ".branches" / TYPE_DIRS[self.type] / self.id
        others = sorted(unquote(p.name) for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []
        return ["main", *others]

    def select(self, branch: str) -> _Repo:
        """Point this view (``dir``, ``files``, ``sha`` ...) at ``branch``."""
        self.branch, self.dir = branch, self.branch_dir(branch)
        return self

    def commit_dir(self, sha: str) -> Path:
        """The files of an earlier commit (kept by every commit made through the API, until squashed)."""
        return self.server.root / ".commits" / TYPE_DIRS[self.type] / self.id / sha

    def select_commit(self, sha: str) -> _Repo:
        self.branch, self.dir = sha, self.commit_dir(sha)
        return self

    def keep_commit(self) -> None:
        """Keep the selected branch's files as its current commit before a commit changes them: a
        commit sha stays readable after the branch moves on, as on the Hub."""
        target = self.commit_dir(self.sha())
        if not target.is_dir():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copytree(self.dir, target, ignore=shutil.ignore_patterns(".git"))

    def files(self) -> list[str]:
        out = []
        for p in sorted(self.dir.rglob("*")):
            rel = p.relative_to(self.dir).as_posix()
            if p.is_file() and not rel.startswith(".git/") and rel != ".git":
                out.append(rel)
        return out

    def blob(self, rel: str) -> dict:
        """size, git sha1 and sha256 of a file (cached on size and mtime)."""
        p = self.dir / rel
        st = p.stat()
        key = (str(p), st.st_size, st.st_mtime_ns)
        with self.server._lock:
            cached = self.server._hash_cache.get(key)
        if cached is None:
            data = p.read_bytes()
            cached = {"size": len(data), "oid": git_blob_sha1(data), "sha256": hashlib.sha256(data).hexdigest()}
            with self.server._lock:
                self.server._hash_cache[key] = cached
        return cached

    def sha(self) -> str:
        h = hashlib.sha1(f"{self.type}:{self.id}\n".encode())
        for rel in self.files():
            h.update(f"{rel}\0{self.blob(rel)['oid']}\n".encode())
        return h.hexdigest()

    def is_lfs(self, rel: str) -> bool:
        return any(fnmatch.fnmatch(rel.rsplit("/", 1)[-1], pat) for pat in LFS_PATTERNS)

    def entry(self, rel: str, sha: str, expand: bool) -> dict:
        if (self.dir / rel).is_dir():
            out = {"type": "directory", "path": rel, "oid": hashlib.sha1(f"tree:{rel}:{sha}".encode()).hexdigest(),
                   "size": 0}
        else:
            blob = self.blob(rel)
            out = {"type": "file", "path": rel, "size": blob["size"], "oid": blob["oid"]}
            if self.is_lfs(rel):
                out["lfs"] = {"oid": blob["sha256"], "size": blob["size"], "pointerSize": 134}
        if expand:
            out["lastCommit"] = {"id": sha, "title": "test commit", "date": "2024-01-01T00:00:00.000Z"}
        return out

    def url(self) -> str:
        prefix = "" if self.type == "model" else f"{TYPE_DIRS[self.type]}/"
        return f"{self.server.url}/{prefix}{self.id}"


class HubServer:
    """Threaded HTTP server emulating the Hub API for the repositories under ``root``.

    Usage::

        server = HubServer(tmp_path / "hub").start()       # server.url == "http://127.0.0.1:PORT"
        server.add_file("datasets/org/name/data/a.jsonl", b"...")
        server.drop_connection("data/a.jsonl", after_bytes=1000)      # once
        ...
        server.count("data/a.jsonl")                       # GET requests for that file
        server.stop()
    """

    def __init__(self, root: str | Path, host: str = "127.0.0.1", port: int = 0):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._hash_cache: dict = {}
        self._faults: dict[str, list[Fault]] = {}
        self._records: list[RequestRecord] = []
        self._commits: dict[tuple[str, str], list[dict]] = {}
        self._visibility: dict[tuple[str, str], str] = {}
        self.required_token: str | None = None
        """When set: writes (and reads of private repos) need ``Authorization: Bearer <required_token>``."""
        self.unhandled: list[str] = []
        self._stopping = threading.Event()
        self._sockets: set[socket.socket] = set()
        self._httpd = _Server((host, port), _Handler)
        self._httpd.hub = self
        self.host, self.port = self._httpd.server_address[:2]
        self.url = f"http://{self.host}:{self.port}"
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> HubServer:
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"hub-server-{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._httpd.shutdown()
        with self._lock:
            sockets = list(self._sockets)
        for sock in sockets:  # idle keep-alive connections of clients: end their handler threads now
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ content

    def repo_dir(self, repo_id: str, repo_type: str = "dataset") -> Path:
        return self.root / TYPE_DIRS[repo_type] / repo_id

    def add_file(self, path_in_root: str, data: bytes | str) -> Path:
        """Write ``<root>/<path_in_root>`` (e.g. ``datasets/org/name/data/train.jsonl``)."""
        target = self.root / path_in_root
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data.encode() if isinstance(data, str) else data)
        return target

    def commits(self, repo_id: str, repo_type: str = "model", revision: str | None = None) -> list[dict]:
        """Commits received for a repo: ``{"oid", "summary", "files", "deleted", "revision"}``; with
        ``revision``, those made to that branch only."""
        with self._lock:
            commits = list(self._commits.get((repo_type, repo_id), []))
        return [c for c in commits if revision is None or c["revision"] == revision]

    def branches(self, repo_id: str, repo_type: str = "model") -> list[str]:
        """The repo's branches, ``main`` first."""
        return _Repo(self, repo_type, repo_id).branches()

    def files(self, repo_id: str, repo_type: str = "model", revision: str = "main") -> list[str]:
        """Paths of the files of one branch of a repo (``.gitattributes`` included)."""
        return _Repo(self, repo_type, repo_id).select(revision).files()

    def branch_dir(self, repo_id: str, revision: str, repo_type: str = "model") -> Path:
        """The folder holding the files of one branch (``repo_dir`` for ``main``)."""
        return _Repo(self, repo_type, repo_id).branch_dir(revision)

    def is_private(self, repo_id: str, repo_type: str = "model") -> bool:
        """Whether ``create_repo`` made the repo private (repos written to disk directly are public)."""
        with self._lock:
            return self._visibility.get((repo_type, repo_id)) == "private"

    # ------------------------------------------------------------------ faults

    def add_fault(self, file: str, fault: Fault) -> Fault:
        """``file``: a path inside a repo (``data/a.jsonl``: its ``resolve`` requests), or a URL path
        starting with "/" (``/api/datasets/org/name``: that exact route, any endpoint)."""
        with self._lock:
            self._faults.setdefault(file, []).append(fault)
        return fault

    def drop_connection(self, file: str, after_bytes: int = 0, times: int | None = 1, repo: str | None = None,
                        methods: tuple[str, ...] = ("GET",)) -> Fault:
        """Send the headers and ``after_bytes`` bytes of the body of ``file``, then close the socket
        (the client sees an incomplete body); ``times=None``: every time."""
        return self.add_fault(file, Fault("drop", times, methods=methods, after_bytes=after_bytes, repo=repo))

    def fail_with(self, file: str, status: int = 503, times: int | None = 1, retry_after: str | None = "0",
                  repo: str | None = None, methods: tuple[str, ...] = ("GET",)) -> Fault:
        """Answer ``status`` (429, 503, 504, ...) with ``Retry-After`` to the first ``times`` requests
        of ``file``; ``times=None``: always."""
        return self.add_fault(file, Fault("status", times, methods=methods, status=status,
                                          retry_after=retry_after, repo=repo))

    def stall(self, file: str, seconds: float, times: int | None = 1, after_bytes: int | None = None,
              repo: str | None = None, methods: tuple[str, ...] = ("GET",)) -> Fault:
        """Say nothing for ``seconds`` (before the headers, or after ``after_bytes`` bytes of the body),
        then close the connection; make ``seconds`` longer than the client's read timeout."""
        return self.add_fault(file, Fault("stall", times, methods=methods, seconds=seconds, after_bytes=after_bytes,
                                          repo=repo))

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def _take_fault(self, file: str, method: str, repo_id: str) -> Fault | None:
        with self._lock:
            for fault in self._faults.get(file, []):
                if fault.matches(method, repo_id):
                    fault.fired += 1
                    return fault
        return None

    # ------------------------------------------------------------------ records

    def requests(self, file: str | None = None, method: str | None = None) -> list[RequestRecord]:
        with self._lock:
            records = list(self._records)
        return [r for r in records if (file is None or r.file == file) and (method is None or r.method == method)]

    def count(self, file: str, method: str = "GET") -> int:
        """Requests (``method``, or all with ``method=None``) made for ``file`` through ``resolve``."""
        return len(self.requests(file, method))

    def reset_records(self) -> None:
        with self._lock:
            self._records.clear()
            self.unhandled.clear()

    def _record(self, record: RequestRecord) -> None:
        with self._lock:
            self._records.append(record)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    hub: HubServer

    def handle_error(self, request, client_address):  # client gone: nothing to report
        pass


class _Response(Exception):
    def __init__(self, status: int, body=None, headers: dict | None = None):
        self.status, self.body, self.headers = status, body, headers or {}


def _error(status: int, message: str, code: str | None = None, headers: dict | None = None) -> _Response:
    h = {"X-Error-Message": message, **(headers or {})}
    if code:
        h["X-Error-Code"] = code
    return _Response(status, {"error": message}, h)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like the Hub
    server_version = "hub-test-server"
    timeout = 60  # idle keep-alive connections end after this

    server: _Server

    # ---------------------------------------------------------------- plumbing

    @property
    def hub(self) -> HubServer:
        return self.server.hub

    def setup(self):
        super().setup()
        with self.hub._lock:
            self.hub._sockets.add(self.connection)

    def finish(self):
        try:
            super().finish()
        except OSError:
            pass
        with self.hub._lock:
            self.hub._sockets.discard(self.connection)

    def log_message(self, format, *args):  # quiet
        pass

    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    def do_DELETE(self):
        self._dispatch("DELETE")

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body=None, headers: dict | None = None) -> None:
        if isinstance(body, (dict, list)):
            data = json.dumps(body).encode()
            ctype = "application/json; charset=utf-8"
        elif isinstance(body, str):
            data, ctype = body.encode(), "text/plain; charset=utf-8"
        else:
            data, ctype = body or b"", "application/octet-stream"
        self.send_response(status)
        headers = {"Content-Type": ctype, **(headers or {})}
        for k, v in headers.items():
            self.send_header(k, str(v))
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _dispatch(self, method: str) -> None:
        split = urlsplit(self.path)
        self.query = parse_qs(split.query)
        self.record = RequestRecord(method, split.path, range=self.headers.get("Range"),
                                    authorization=self.headers.get("Authorization"))
        self.hub._record(self.record)  # recorded now, completed below (a stalled request stays pending)
        body = self._body() if method in ("POST", "PUT") else b""
        try:
            if self._url_fault(method, split.path):
                return
            self._route(method, split.path, body)
        except _Response as r:
            self.record.status = r.status
            self._send(r.status, r.body, r.headers)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _url_fault(self, method: str, path: str) -> bool:
        """Faults registered for a URL path (a key starting with "/"), on any route: status answers as
        for files; "drop" and "stall" close the connection without an answer. True when one fired."""
        fault = self.hub._take_fault(path, method, None)
        if fault is None:
            return False
        self.record.fault = fault.kind
        if fault.kind == "status":
            headers = {"Retry-After": fault.retry_after} if fault.retry_after is not None else {}
            raise _error(fault.status, f"injected {fault.status}", headers=headers)
        if fault.kind == "stall":
            self.hub._stopping.wait(fault.seconds)
        self.record.status = 0
        self._abort()
        return True

    def _abort(self) -> None:
        """Close the socket without finishing the response."""
        self.close_connection = True
        try:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    # ---------------------------------------------------------------- routing

    def _route(self, method: str, path: str, body: bytes) -> None:
        parts = [unquote(p) for p in path.strip("/").split("/")] if path.strip("/") else []
        write = method in ("PUT", "DELETE") or (method == "POST" and (
            parts == ["api", "repos", "create"] or (len(parts) >= 5 and parts[4] in ("preupload", "commit", "branch",
                                                                                    "super-squash"))))
        if write and not self._authorized():
            raise _error(401, "Invalid credentials in Authorization header")
        if method == "POST" and parts == ["api", "repos", "create"]:
            return self._create_repo(json.loads(body or b"{}"))
        if method == "POST" and parts == ["api", "validate-yaml"]:
            raise _Response(200, {"errors": [], "warnings": []})
        if len(parts) >= 4 and parts[0] == "api" and parts[1] in REPO_TYPES:
            repo = _Repo(self.hub, REPO_TYPES[parts[1]], f"{parts[2]}/{parts[3]}")
            self.record.repo_id = repo.id
            return self._api(method, repo, parts[4:], body)
        # /[datasets/|spaces/]{org}/{name}/resolve/{rev}/{file...}
        rest, repo_type = parts, "model"
        if rest and rest[0] in ("datasets", "spaces"):
            repo_type, rest = REPO_TYPES[rest[0]], rest[1:]
        if len(rest) >= 5 and rest[2] == "resolve" and method in ("GET", "HEAD"):
            repo = _Repo(self.hub, repo_type, f"{rest[0]}/{rest[1]}")
            self.record.repo_id = repo.id
            # the revision is one quoted segment ("refs%2Fpr%2F1") except for unquoted refs/... ones
            raw = [p for p in path.strip("/").split("/")]
            offset = 4 if repo_type == "model" else 5
            rev_and_file = raw[offset - 1:]
            if rev_and_file[0] == "refs" and len(rev_and_file) > 3:
                rev, file_parts = "/".join(rev_and_file[:3]), rev_and_file[3:]
            else:
                rev, file_parts = rev_and_file[0], rev_and_file[1:]
            return self._resolve(method, repo, unquote(rev), unquote("/".join(file_parts)))
        self.hub.unhandled.append(f"{method} {self.path}")
        raise _error(404, f"Not found: {method} {path}")

    def _check(self, repo: _Repo, rev: str | None = None) -> str:
        """The repo's sha, or the errors the Hub answers for a missing repo / revision."""
        if not repo.exists():
            raise _error(404, "Repository not found", "RepoNotFound")
        if self.hub.is_private(repo.id, repo.type) and not self._authorized():
            raise _error(401, "Repository not found", "RepoNotFound")
        rev = rev.removeprefix("refs/heads/") if rev is not None else None
        if rev is None or rev == "main":
            return repo.select("main").sha()
        branches = repo.branches()
        if rev in branches:
            return repo.select(rev).sha()
        for branch in branches:  # a commit sha: the branch whose files it is
            if SHA_RE.match(rev) and repo.select(branch).sha() == rev:
                return rev
        if SHA_RE.match(rev) and repo.commit_dir(rev).is_dir():  # an earlier commit
            repo.select_commit(rev)
            return rev
        repo.select("main")
        raise _error(404, f"Invalid rev id: {rev}", "RevisionNotFound")

    def _authorized(self) -> bool:
        token = self.hub.required_token
        return token is None or self.headers.get("Authorization") == f"Bearer {token}"

    def _api(self, method: str, repo: _Repo, rest: list[str], body: bytes) -> None:
        if method == "GET" and (not rest or (len(rest) == 2 and rest[0] == "revision")):
            sha = self._check(repo, rest[1] if rest else None)
            raise _Response(200, self._info(repo, sha))
        if method == "GET" and rest and rest[0] == "tree" and len(rest) >= 2:
            sha = self._check(repo, rest[1])
            return self._tree(repo, sha, "/".join(rest[2:]))
        if method == "POST" and rest and rest[0] == "paths-info" and len(rest) == 2:
            sha = self._check(repo, rest[1])
            form = parse_qs(body.decode())
            expand = form.get("expand", ["False"])[0].lower() == "true"
            out = [repo.entry(p.strip("/"), sha, expand) for p in form.get("paths", [])
                   if (repo.dir / p.strip("/")).exists()]
            raise _Response(200, out)
        if method == "POST" and rest and rest[0] == "preupload" and len(rest) == 2:
            self._check(repo, rest[1])
            files = json.loads(body or b"{}").get("files", [])
            out = []
            for f in files:
                target = repo.dir / f["path"]
                oid = repo.blob(f["path"])["oid"] if target.is_file() else None
                out.append({"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": oid})
            raise _Response(200, {"files": out, "commitOid": repo.sha()})
        if method == "POST" and rest and rest[0] == "commit" and len(rest) == 2:
            return self._commit(repo, rest[1], body)
        if method == "POST" and rest and rest[0] == "super-squash" and len(rest) == 2:
            return self._squash(repo, rest[1])
        if method in ("POST", "DELETE") and rest and rest[0] == "branch" and len(rest) == 2:
            return (self._create_branch if method == "POST" else self._delete_branch)(repo, rest[1], body)
        if method == "GET" and rest == ["refs"]:
            self._check(repo)
            branches = [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": _Repo(self.hub, repo.type, repo.id)
                         .select(b).sha()} for b in repo.branches()]
            out = {"branches": branches, "converts": [], "tags": []}
            if self.query.get("include_prs"):
                out["pullRequests"] = []
            raise _Response(200, out)
        self._check(repo)
        self.hub.unhandled.append(f"{method} {self.path}")
        raise _error(404, f"Not found: {method} {self.path}", "EntryNotFound")

    # ---------------------------------------------------------------- read endpoints

    def _info(self, repo: _Repo, sha: str) -> dict:
        info = {
            "_id": hashlib.sha1(repo.id.encode()).hexdigest()[:24],
            "id": repo.id,
            "author": repo.id.split("/")[0],
            "sha": sha,
            "private": self.hub.is_private(repo.id, repo.type),
            "disabled": False,
            "gated": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "lastModified": "2024-01-01T00:00:00.000Z",
            "createdAt": "2024-01-01T00:00:00.000Z",
            "siblings": [{"rfilename": f} for f in repo.files()],
            "cardData": {},
        }
        if repo.type == "model":
            info["modelId"] = repo.id
        return info

    def _tree(self, repo: _Repo, sha: str, subdir: str) -> None:
        base = repo.dir / subdir if subdir else repo.dir
        if not base.exists():
            raise _error(404, f"{subdir} does not exist on {repo.branch}", "EntryNotFound")
        recursive = self.query.get("recursive", ["false"])[0].lower() in ("true", "1")
        expand = self.query.get("expand", ["false"])[0].lower() in ("true", "1")
        if base.is_file():
            raise _Response(200, [repo.entry(subdir, sha, expand)])
        children = sorted(base.rglob("*") if recursive else base.iterdir())
        out = []
        for p in children:
            rel = p.relative_to(repo.dir).as_posix()
            if rel == ".git" or rel.startswith(".git/"):
                continue
            out.append(repo.entry(rel, sha, expand))
        # the Hub lists directories first
        out.sort(key=lambda e: (e["type"] != "directory", e["path"]))
        raise _Response(200, out)

    def _resolve(self, method: str, repo: _Repo, rev: str, file: str) -> None:
        self.record.file = file
        sha = self._check(repo, rev)
        target = repo.dir / file
        if not target.is_file():
            raise _error(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": sha})
        blob = repo.blob(file)
        size = blob["size"]
        headers = {
            "X-Repo-Commit": sha,
            "Accept-Ranges": "bytes",
            "Content-Disposition": f'inline; filename="{file.rsplit("/", 1)[-1]}"',
        }
        if repo.is_lfs(file):
            headers["ETag"] = f'"{blob["sha256"]}"'
            headers["X-Linked-Etag"] = f'"{blob["sha256"]}"'
            headers["X-Linked-Size"] = str(size)
        else:
            headers["ETag"] = f'"{blob["oid"]}"'
        start, end, status = 0, size - 1, 200
        rng = self.headers.get("Range")
        if rng:
            m = re.fullmatch(r"\s*bytes=(\d*)-(\d*)\s*", rng)
            if not m or (not m.group(1) and not m.group(2)):
                raise _error(416, f"Invalid range {rng}", headers={"Content-Range": f"bytes */{size}"})
            if m.group(1):
                start = int(m.group(1))
                end = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
            else:  # suffix range: the last N bytes
                start, end = max(0, size - int(m.group(2))), size - 1
            if start >= size or start > end:
                raise _error(416, "Requested range not satisfiable", headers={"Content-Range": f"bytes */{size}"})
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"

        fault = self.hub._take_fault(file, method, repo.id)
        if fault is not None:
            self.record.fault = fault.kind
            if fault.kind == "status":
                extra = {"X-Repo-Commit": sha}
                if fault.retry_after is not None:
                    extra["Retry-After"] = fault.retry_after
                raise _error(fault.status, f"injected {fault.status}", headers=extra)
            if fault.kind == "stall" and fault.after_bytes is None:
                self.hub._stopping.wait(fault.seconds)
                self.record.status = 0
                return self._abort()

        with open(target, "rb") as fh:
            fh.seek(start)
            data = fh.read(end - start + 1)
        self.record.status = status
        self.send_response(status)
        headers.update({"Content-Type": "application/octet-stream", "Content-Length": str(len(data))})
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        if method == "HEAD":
            return
        if fault is not None:  # drop / stall in the middle of the body
            cut = min(fault.after_bytes or 0, max(0, len(data) - 1))
            self.wfile.write(data[:cut])
            self.wfile.flush()
            if fault.kind == "stall":
                self.hub._stopping.wait(fault.seconds)
            return self._abort()
        self.wfile.write(data)

    # ---------------------------------------------------------------- write endpoints

    def _create_repo(self, payload: dict) -> None:
        name = payload.get("name")
        org = payload.get("organization") or "me"
        repo_type = payload.get("type") or "model"
        if not name or repo_type not in TYPE_DIRS:
            raise _error(400, "Invalid repo name or type")
        repo = _Repo(self.hub, repo_type, f"{org}/{name}")
        self.record.repo_id = repo.id
        if repo.exists():
            raise _Response(409, {"error": f"You already created this {repo_type} repo", "url": repo.url()},
                            {"X-Error-Message": f"You already created this {repo_type} repo"})
        repo.dir.mkdir(parents=True)
        (repo.dir / ".gitattributes").write_text("*.safetensors filter=lfs diff=lfs merge=lfs -text\n")
        visibility = payload.get("visibility") or ("private" if payload.get("private") else "public")
        with self.hub._lock:
            self.hub._visibility[(repo.type, repo.id)] = visibility
        raise _Response(200, {"url": repo.url(), "name": repo.id, "id": repo.id})

    def _commit(self, repo: _Repo, rev: str, body: bytes) -> None:
        self._check(repo, rev)
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        header = next((item["value"] for item in lines if item.get("key") == "header"), {})
        written, deleted = [], []
        with self.hub._lock:
            repo.keep_commit()
            for item in lines:
                key, value = item.get("key"), item.get("value") or {}
                if key == "header":
                    continue
                path = value.get("path", "").strip("/")
                if not path or ".." in path.split("/"):
                    raise _error(400, f"Invalid path {path!r}")
                target = repo.dir / path
                if key == "file":
                    content = value.get("content", "")
                    data = base64.b64decode(content) if value.get("encoding") == "base64" else content.encode()
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(data)
                    written.append(path)
                elif key == "deletedFile":
                    if not target.is_file():
                        raise _error(404, "A file with this name doesn't exist", "EntryNotFound")
                    target.unlink()
                    deleted.append(path)
                elif key == "deletedFolder":
                    if target.is_dir():
                        shutil.rmtree(target)
                    deleted.append(path + "/")
                else:  # lfsFile / copies: never asked for, since preupload answers "regular"
                    raise _error(400, f"Unsupported commit operation {key!r}")
            oid = repo.sha()
            self.hub._commits.setdefault((repo.type, repo.id), []).append(
                {"oid": oid, "summary": header.get("summary"), "files": written, "deleted": deleted,
                 "revision": repo.branch})
        raise _Response(200, {
            "success": True,
            "commitOid": oid,
            "commitUrl": f"{repo.url()}/commit/{oid}",
            "commitMessage": header.get("summary"),
            "hookOutput": "",
            "pullRequestUrl": None,
        })

    def _create_branch(self, repo: _Repo, branch: str, body: bytes) -> None:
        """``HfApi.create_branch``: a copy of ``startingPoint`` (default ``main``); 409 when it exists."""
        self._check(repo)
        if not branch or branch.startswith("refs/") or ".." in branch or SHA_RE.match(branch):
            raise _error(400, f"Invalid reference for a branch: {branch}")
        source = _Repo(self.hub, repo.type, repo.id)
        self._check(source, (json.loads(body or b"{}") or {}).get("startingPoint"))
        with self.hub._lock:
            if branch in repo.branches():
                raise _error(409, "Reference already exists")
            target = repo.branch_dir(branch)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copytree(source.dir, target, ignore=shutil.ignore_patterns(".git"))
        raise _Response(200, {})

    def _squash(self, repo: _Repo, branch: str) -> None:
        """``HfApi.super_squash_history``: the branch becomes one commit; the earlier commits are gone."""
        sha = self._check(repo, branch)
        with self.hub._lock:
            shutil.rmtree(repo.commit_dir(sha).parent, ignore_errors=True)
        raise _Response(200, {"commitId": sha})

    def _delete_branch(self, repo: _Repo, branch: str, body: bytes) -> None:
        self._check(repo)
        if branch == "main":
            raise _error(403, "Cannot delete the default branch")
        with self.hub._lock:
            if branch not in repo.branches():
                raise _error(404, f"Invalid rev id: {branch}", "RevisionNotFound")
            shutil.rmtree(repo.branch_dir(branch))
        raise _Response(200, {})


__all__ = ["Fault", "HubServer", "RequestRecord", "git_blob_sha1"]
