"""The HTTP side of the stand-in hub: routes, the JSON it answers, and the hub's error headers.

Answers mirror the real hub's: file resolves carry `X-Repo-Commit`, `ETag` and `Content-Length`
(plus `X-Linked-Etag`/`X-Linked-Size` for LFS files) and never redirect or name a Xet hash, and
errors carry the `X-Error-Code` huggingface_hub maps to its exceptions.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime
from http.server import BaseHTTPRequestHandler
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, unquote, urlsplit

if TYPE_CHECKING:
    from standin_hub import Blob, Commit, Repo, StandinHub


class HubError(Exception):
    """An error answer: status, the hub's `X-Error-Code`, a message, and extra headers."""

    def __init__(self, status: int, code: str | None, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


def git_oid(data: bytes) -> str:
    """The git blob id of `data`, as the hub reports it."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


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

    def listing(names: dict[str, str], kind: str, pulls: bool = False) -> list[dict]:
        return [
            {"name": name, "ref": name if pulls else f"refs/{kind}/{name}", "targetCommit": sha}
            for name, sha in sorted(names.items())
            if name.startswith("refs/pr/") == pulls
        ]

    return {
        "branches": listing(repo.branches, "heads"),
        "tags": listing(repo.tags, "tags"),
        "converts": [],
        "pullRequests": listing(repo.branches, "heads", pulls=True),
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


def split_revision(segments: list[str]) -> tuple[str, list[str]]:
    """The revision that leads `segments` (main if none) and the rest; an unquoted `refs/pr/1` spans three."""
    if len(segments) >= 3 and segments[0] == "refs" and segments[1] in ("pr", "heads", "tags"):
        return "/".join(segments[:3]), segments[3:]
    return (segments[0], segments[1:]) if segments else ("main", [])


def api_answer(hub: StandinHub, segments: list[str], query: dict, form: dict, token: str | None) -> Answer:
    """Answer `/api/...`: `segments` are the unquoted path segments after `api`."""
    if segments == ["whoami-v2"]:
        if token != hub.token:
            raise HubError(401, None, "Invalid credentials in Authorization header")
        return as_json({"type": "user", "name": "standin", "orgs": [], "auth": {"type": "access_token"}})
    if len(segments) < 3 or segments[0] not in ("models", "datasets", "spaces"):
        raise HubError(404, None, "Not found")
    repo = visible_repo(hub, segments[0][:-1], "/".join(segments[1:3]), token, files=False)
    action, tail = (segments[3], segments[4:]) if len(segments) > 3 else ("revision", [])
    if action == "refs":
        return as_json(refs(repo))
    revision, path = split_revision(tail)
    commit = repo.resolve(revision)
    if action == "revision":
        return as_json(repo_info(repo, commit))
    if action == "tree":
        recursive, expand = (query.get(key, ["False"])[0].lower() == "true" for key in ("recursive", "expand"))
        return as_json(tree(commit, "/".join(path).strip("/"), recursive, expand))
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
    revision, path_segments = split_revision(rest[3:])
    commit = visible_repo(hub, repo_type, "/".join(rest[:2]), token, files=True).resolve(revision)
    path = "/".join(path_segments)
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
        except (ValueError, IndexError) as error:
            # A malformed request (bad Range, too few path segments) gets the hub's 400, which clients
            # raise at once; a dropped connection would look like a network failure and be retried.
            status, headers, payload = self.error_answer(HubError(400, None, f"Bad request: {error!r}"))
        except HubError as error:
            status, headers, payload = self.error_answer(error)
        self.send_response(status)
        for name, value in {**headers, "Content-Length": str(len(payload))}.items():
            self.send_header(name, value)
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(payload)

    @staticmethod
    def error_answer(error: HubError) -> Answer:
        """The status, `X-Error-*` headers and JSON body the hub sends for `error`."""
        headers = {**error.headers, "X-Error-Message": error.message, "Content-Type": "application/json"}
        headers.update({"X-Error-Code": error.code} if error.code else {})
        return error.status, headers, json.dumps({"error": error.message}).encode()
