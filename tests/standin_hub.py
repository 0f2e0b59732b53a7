"""A stand-in Hugging Face hub served on loopback, for tests of hub downloads.

It answers the slice of the hub's HTTP API that `huggingface_hub`, `datasets` and lm-eval call
(repo info, tree listings, paths-info, refs, commits and file resolves), with the same status
codes and `X-Error-Code` headers as the real hub, so the real clients raise their usual errors.
Files are served as plain HTTP with no Xet headers, so clients never try the Xet protocol.
Only the standard library is used; the server runs in a daemon thread of the test process.
"""

from __future__ import annotations

import atexit
import hashlib
import itertools
import json
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

# Files the real hub stores in LFS: their ETag is the content's sha256, not the git blob id.
LFS_SUFFIXES = (".safetensors", ".bin", ".parquet", ".arrow", ".pt", ".pth", ".gguf", ".onnx", ".msgpack", ".h5")
REPO_TYPES = ("model", "dataset", "space")
DEFAULT_TOKEN = "hf_standin_token_0123456789"

_commit_counter = itertools.count()


class HubError(Exception):
    """An error answer: status, the hub's `X-Error-Code`, a message, and extra headers."""

    def __init__(self, status: int, code: str | None, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


def git_oid(data: bytes) -> str:
    """The git blob id of `data`, as the hub reports it."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass(frozen=True)
class Blob:
    """One file's bytes and the ids the hub derives from them."""

    data: bytes
    lfs: bool

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def pointer(self) -> bytes:
        return f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\nsize {len(self.data)}\n".encode()

    @property
    def oid(self) -> str:
        """The git blob id: of the LFS pointer for LFS files, of the bytes otherwise."""
        return git_oid(self.pointer if self.lfs else self.data)

    @property
    def etag(self) -> str:
        return self.sha256 if self.lfs else self.oid


@dataclass(frozen=True)
class Commit:
    """An immutable snapshot of a repo's files."""

    sha: str
    files: dict[str, Blob]
    title: str
    date: datetime
    parent: str | None

    def folders(self) -> set[str]:
        """Every folder that holds a file, at any depth."""
        return {"/".join(path.split("/")[:depth]) for path in self.files for depth in range(1, path.count("/") + 1)}


@dataclass
class Repo:
    """A repo's refs and every commit it ever had."""

    repo_type: str
    repo_id: str
    gated: bool = False
    private: bool = False
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)

    def resolve(self, revision: str) -> Commit:
        """The commit a branch, tag, `refs/...` name or full sha names; RevisionNotFound otherwise."""
        name = revision.removeprefix("refs/heads/").removeprefix("refs/tags/")
        sha = self.branches.get(name) or self.tags.get(name) or (revision if revision in self.commits else None)
        if sha is None:
            raise HubError(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return self.commits[sha]


def to_bytes(content: bytes | str | Path) -> bytes:
    """File content given as bytes, text, or the path of a local file."""
    if isinstance(content, Path):
        return content.read_bytes()
    return content.encode() if isinstance(content, str) else bytes(content)


def make_commit(repo: Repo, files: dict[str, Blob], title: str, parent: str | None) -> Commit:
    """A new commit of `repo` holding `files`, with a sha no other commit has."""
    digest = hashlib.sha1(f"{repo.repo_type}/{repo.repo_id}/{parent}/{next(_commit_counter)}".encode())
    for path in sorted(files):
        digest.update(f"{path}\0{files[path].oid}\n".encode())
    return Commit(digest.hexdigest(), dict(files), title, datetime.now(UTC), parent)


class StandinHub:
    """A hub on 127.0.0.1 at a free port; starts at once, stops on `close()`, context exit or process exit.

    `requests` logs every `(method, path)` served, so a test can assert an offline run made no calls.
    `token` is the one token the hub accepts for gated and private repos.
    """

    def __init__(self, token: str = DEFAULT_TOKEN) -> None:
        self.token = token
        self.requests: list[tuple[str, str]] = []
        self.repos: dict[tuple[str, str], Repo] = {}
        self.lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), HubHandler)
        self._server.daemon_threads = True
        self._server.hub = self  # type: ignore[attr-defined]
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, name="standin-hub", daemon=True
        )
        self._thread.start()
        atexit.register(self.close)

    def __enter__(self) -> StandinHub:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop serving; safe to call twice."""
        if self._thread.is_alive():
            self._server.shutdown()
            self._server.server_close()
            self._thread.join()

    def add_repo(
        self,
        repo_id: str,
        files: dict[str, bytes | str | Path],
        *,
        repo_type: str = "model",
        branch: str = "main",
        tags: tuple[str, ...] | list[str] = (),
        gated: bool = False,
        private: bool = False,
    ) -> str:
        """Create a repo whose first commit holds `files` on `branch`, tagged `tags`; returns its sha."""
        if repo_type not in REPO_TYPES:
            raise ValueError(f"repo_type must be one of {REPO_TYPES}, got {repo_type!r}")
        with self.lock:
            if (repo_type, repo_id) in self.repos:
                raise ValueError(f"{repo_type} repo {repo_id} already exists; use commit() to change it")
            self.repos[repo_type, repo_id] = Repo(repo_type, repo_id, gated=gated, private=private)
        sha = self.commit(repo_id, files, repo_type=repo_type, branch=branch, title="Initial commit")
        for tag in tags:
            self.add_tag(repo_id, tag, sha, repo_type=repo_type)
        return sha

    def commit(
        self,
        repo_id: str,
        files: dict[str, bytes | str | Path | None],
        *,
        repo_type: str = "model",
        branch: str = "main",
        title: str = "Update files",
    ) -> str:
        """Commit `files` on top of `branch` (created if new; a None value deletes a file); returns the sha.

        Earlier commits stay downloadable by sha and by any tag that names them.
        """
        with self.lock:
            repo = self.repo(repo_type, repo_id)
            parent = repo.branches.get(branch)
            merged = dict(repo.commits[parent].files) if parent else {}
            for path, content in files.items():
                if content is None:
                    merged.pop(path, None)
                else:
                    merged[path.lstrip("/")] = Blob(to_bytes(content), lfs=path.endswith(LFS_SUFFIXES))
            new = make_commit(repo, merged, title, parent)
            repo.commits[new.sha] = new
            repo.branches[branch] = new.sha
            return new.sha

    def add_tag(self, repo_id: str, tag: str, revision: str = "main", *, repo_type: str = "model") -> str:
        """Point tag `tag` at the commit `revision` names; returns that commit's sha."""
        repo = self.repo(repo_type, repo_id)
        sha = repo.resolve(revision).sha
        repo.tags[tag] = sha
        return sha

    def head(self, repo_id: str, *, repo_type: str = "model", branch: str = "main") -> str:
        """The sha `branch` points at now."""
        return self.repo(repo_type, repo_id).branches[branch]

    def repo(self, repo_type: str, repo_id: str) -> Repo:
        """The stored repo; KeyError if the test never added it."""
        return self.repos[repo_type, repo_id]

    def clear_requests(self) -> None:
        """Forget the requests served so far."""
        self.requests.clear()


def iso(date: datetime) -> str:
    return date.strftime("%Y-%m-%dT%H:%M:%S.000Z")


def bearer(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header."""
    return authorization.split(" ", 1)[1].strip() if authorization and " " in authorization else None


def visible_repo(hub: StandinHub, repo_type: str, repo_id: str, token: str | None, files: bool) -> Repo:
    """The repo, if this token may see it (and, with `files`, read its files); the hub's error otherwise.

    As on the real hub: unknown and private repos answer RepoNotFound (401 anonymous, 404 with a token);
    gated repos show their metadata to anyone but their files only to the granted token.
    """
    repo = hub.repos.get((repo_type, repo_id))
    if repo is None or (repo.private and token != hub.token):
        raise HubError(401 if token is None else 404, "RepoNotFound", "Repository not found")
    if files and repo.gated and token != hub.token:
        prefix = f"Access to {repo_type} {repo_id} is restricted"
        if token is None:
            raise HubError(401, "GatedRepo", f"{prefix}. You must have access to it and be authenticated to access it.")
        raise HubError(403, "GatedRepo", f"{prefix} and you are not in the authorized list.")
    return repo


def last_commit(commit: Commit) -> dict:
    return {"id": commit.sha, "title": commit.title, "date": iso(commit.date)}


def file_entry(path: str, blob: Blob, commit: Commit, expand: bool) -> dict:
    """A file as the tree and paths-info routes list it."""
    entry: dict = {"type": "file", "oid": blob.oid, "size": len(blob.data), "path": path}
    if blob.lfs:
        entry["lfs"] = {"oid": blob.sha256, "size": len(blob.data), "pointerSize": len(blob.pointer)}
    if expand:
        entry["lastCommit"] = last_commit(commit)
    return entry


def folder_entry(path: str, commit: Commit, expand: bool) -> dict:
    """A folder as the tree and paths-info routes list it."""
    entry: dict = {"type": "directory", "oid": git_oid(f"{commit.sha}/{path}".encode()), "size": 0, "path": path}
    if expand:
        entry["lastCommit"] = last_commit(commit)
    return entry


def tree(commit: Commit, folder: str, recursive: bool, expand: bool) -> list[dict]:
    """Entries under `folder` (the root when empty): folders first, then files, each sorted."""
    folders = commit.folders()
    if folder and folder not in folders:
        raise HubError(404, "EntryNotFound", f"{folder} does not exist", {"X-Repo-Commit": commit.sha})
    base = f"{folder}/" if folder else ""

    def listed(path: str) -> bool:
        return path.startswith(base) and (recursive or "/" not in path[len(base) :])

    entries = [folder_entry(path, commit, expand) for path in sorted(filter(listed, folders))]
    return entries + [
        file_entry(path, commit.files[path], commit, expand) for path in sorted(filter(listed, commit.files))
    ]


def repo_info(repo: Repo, commit: Commit) -> dict:
    """The `/api/{type}s/{repo}[/revision/{rev}]` answer (siblings carry blob metadata)."""
    first = min(repo.commits.values(), key=lambda each: each.date)
    siblings = []
    for path, blob in sorted(commit.files.items()):
        sibling: dict = {"rfilename": path, "size": len(blob.data), "blobId": blob.oid}
        if blob.lfs:
            sibling["lfs"] = {"size": len(blob.data), "sha256": blob.sha256, "pointerSize": len(blob.pointer)}
        siblings.append(sibling)
    return {
        "_id": git_oid(f"{repo.repo_type}/{repo.repo_id}".encode())[:24],
        "id": repo.repo_id,
        "author": repo.repo_id.split("/")[0],
        "sha": commit.sha,
        "lastModified": iso(commit.date),
        "createdAt": iso(first.date),
        "private": repo.private,
        "gated": "manual" if repo.gated else False,
        "disabled": False,
        "downloads": 0,
        "likes": 0,
        "tags": [],
        "siblings": siblings,
    }


def refs(repo: Repo) -> dict:
    """The `/refs` answer: branches and tags with the commits they point at."""

    def listing(names: dict[str, str], kind: str) -> list[dict]:
        return [
            {"name": name, "ref": f"refs/{kind}/{name}", "targetCommit": sha} for name, sha in sorted(names.items())
        ]

    return {
        "branches": listing(repo.branches, "heads"),
        "tags": listing(repo.tags, "tags"),
        "converts": [],
        "pullRequests": [],
    }


def history(repo: Repo, commit: Commit) -> list[dict]:
    """The `/commits/{rev}` answer: this commit and its ancestors, newest first."""
    chain = [commit]
    while chain[-1].parent is not None:
        chain.append(repo.commits[chain[-1].parent])
    return [{**last_commit(each), "message": "", "authors": [{"user": "standin"}]} for each in chain]


def paths_info(commit: Commit, form: dict[str, list[str]]) -> list[dict]:
    """The `/paths-info/{rev}` answer: the listed paths that exist, files or folders."""
    expand = form.get("expand", ["False"])[0].lower() == "true"
    folders = commit.folders()
    entries = []
    for path in (each.strip("/") for each in form.get("paths", [])):
        if path in commit.files:
            entries.append(file_entry(path, commit.files[path], commit, expand))
        elif path in folders:
            entries.append(folder_entry(path, commit, expand))
    return entries


Answer = tuple[int, dict[str, str], bytes]


def as_json(payload: object) -> Answer:
    return 200, {"Content-Type": "application/json"}, json.dumps(payload).encode()


def api_answer(hub: StandinHub, segments: list[str], query: dict, form: dict, token: str | None) -> Answer:
    """Answer `/api/...`: `segments` are the unquoted path segments after `api`."""
    if segments == ["whoami-v2"]:
        if token != hub.token:
            raise HubError(401, None, "Invalid credentials in Authorization header")
        return as_json({"type": "user", "name": "standin", "orgs": [], "auth": {"type": "access_token"}})
    if len(segments) < 3 or segments[0] not in ("models", "datasets", "spaces"):
        raise HubError(404, None, "Not found")
    repo = visible_repo(hub, segments[0][:-1], "/".join(segments[1:3]), token, files=False)
    action, tail = (segments[3], segments[4:]) if len(segments) > 3 else ("revision", ["main"])
    if action == "refs":
        return as_json(refs(repo))
    commit = repo.resolve(tail[0] if tail else "main")
    if action == "revision":
        return as_json(repo_info(repo, commit))
    if action == "tree":
        recursive, expand = (query.get(key, ["False"])[0].lower() == "true" for key in ("recursive", "expand"))
        return as_json(tree(commit, "/".join(tail[1:]).strip("/"), recursive, expand))
    if action == "paths-info":
        return as_json(paths_info(commit, form))
    if action == "commits":
        return as_json(history(repo, commit))
    raise HubError(404, None, f"The stand-in hub does not serve /api/.../{action}")


def byte_range(spec: str | None, size: int) -> tuple[int, int] | None:
    """The inclusive (first, last) byte of a `Range: bytes=...` header; None for the whole file."""
    if not spec or not spec.startswith("bytes="):
        return None
    first, _, last = spec.removeprefix("bytes=").split(",")[0].partition("-")
    start, end = (size - int(last), size - 1) if first == "" else (int(first), int(last) if last else size - 1)
    if start >= size or start > end:
        raise HubError(416, None, "Range not satisfiable", {"Content-Range": f"bytes */{size}"})
    return max(start, 0), min(end, size - 1)


def resolve_answer(hub: StandinHub, segments: list[str], token: str | None, range_spec: str | None) -> Answer:
    """Answer `/[datasets/|spaces/]{repo}/resolve/{rev}/{path}` with the file's bytes and hub headers."""
    repo_type = {"datasets": "dataset", "spaces": "space"}.get(segments[0], "model")
    rest = segments[1:] if repo_type != "model" else segments
    if len(rest) < 5 or rest[2] != "resolve":
        raise HubError(404, None, "Not found")
    commit = visible_repo(hub, repo_type, "/".join(rest[:2]), token, files=True).resolve(rest[3])
    path = "/".join(rest[4:])
    blob = commit.files.get(path)
    if blob is None:
        raise HubError(404, "EntryNotFound", f"{path} does not exist on the revision", {"X-Repo-Commit": commit.sha})
    headers = {"X-Repo-Commit": commit.sha, "ETag": f'"{blob.etag}"', "Accept-Ranges": "bytes"}
    headers["Content-Type"] = "application/octet-stream"
    if blob.lfs:
        headers.update({"X-Linked-Etag": f'"{blob.etag}"', "X-Linked-Size": str(len(blob.data))})
    span = byte_range(range_spec, len(blob.data))
    if span is None:
        return 200, headers, blob.data
    headers["Content-Range"] = f"bytes {span[0]}-{span[1]}/{len(blob.data)}"
    return 206, headers, blob.data[span[0] : span[1] + 1]


class HubHandler(BaseHTTPRequestHandler):
    """Serves one request against the `StandinHub` the server carries (keep-alive HTTP/1.1)."""

    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self.answer("GET")

    def do_HEAD(self) -> None:
        self.answer("HEAD")

    def do_POST(self) -> None:
        self.answer("POST")

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: the hub's `requests` list is the log."""

    def answer(self, method: str) -> None:
        hub: StandinHub = self.server.hub  # type: ignore[attr-defined]
        split = urlsplit(self.path)
        hub.requests.append((method, split.path))
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        segments = [unquote(each) for each in split.path.split("/")[1:]]
        token = bearer(self.headers.get("Authorization"))
        try:
            if segments[0] == "api":
                form = parse_qs(body.decode()) if method == "POST" else {}
                status, headers, payload = api_answer(hub, segments[1:], parse_qs(split.query), form, token)
            else:
                status, headers, payload = resolve_answer(hub, segments, token, self.headers.get("Range"))
        except HubError as error:
            status, headers = error.status, {**error.headers, "X-Error-Message": error.message}
            headers.update({"X-Error-Code": error.code} if error.code else {})
            headers["Content-Type"] = "application/json"
            payload = json.dumps({"error": error.message}).encode()
        self.send_response(status)
        for name, value in {**headers, "Content-Length": str(len(payload))}.items():
            self.send_header(name, value)
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(payload)
