"""A stand-in Hugging Face hub served on loopback, for tests of hub downloads.

It answers the slice of the hub's HTTP API that `huggingface_hub`, `datasets` and lm-eval call
(repo info, tree listings, paths-info, refs, commits and file resolves), with the same status
codes and `X-Error-Code` headers as the real hub, so the real clients raise their usual errors.
This module holds the repos, commits and files; `standin_hub_http` answers the requests.
Only the standard library is used; the server runs in a daemon thread of the test process.
"""

from __future__ import annotations

import atexit
import hashlib
import itertools
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import ThreadingHTTPServer
from pathlib import Path

from standin_hub_http import HubError, HubHandler, git_oid

# Files the real hub stores in LFS: their ETag is the content's sha256, not the git blob id.
LFS_SUFFIXES = (".safetensors", ".bin", ".parquet", ".arrow", ".pt", ".pth", ".gguf", ".onnx", ".msgpack", ".h5")
REPO_TYPES = ("model", "dataset", "space")
DEFAULT_TOKEN = "hf_standin_token_0123456789"

_commit_counter = itertools.count()


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
        atexit.unregister(self.close)
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
        """Commit `files` on top of `branch` (new ones fork from main; a None value deletes a file); returns the sha.

        Earlier commits stay downloadable by sha and by any tag that names them.
        """
        with self.lock:
            repo = self.repo(repo_type, repo_id)
            # A new branch (or pull request ref) starts from main, as branches made on the hub do.
            parent = repo.branches.get(branch, repo.branches.get("main"))
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

    def open_pr(self, repo_id: str, files: dict[str, bytes | str | Path | None], *, repo_type: str = "model") -> str:
        """Open a pull request whose one commit adds `files` to main; returns its ref, `refs/pr/<n>`."""
        repo = self.repo(repo_type, repo_id)
        ref = f"refs/pr/{1 + sum(name.startswith('refs/pr/') for name in repo.branches)}"
        self.commit(repo_id, files, repo_type=repo_type, branch=ref, title="Pull request")
        return ref

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
