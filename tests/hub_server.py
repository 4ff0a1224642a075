"""A loopback Hugging Face Hub for tests: the part of the Hub's HTTP protocol that `huggingface_hub` speaks when it
creates repos, uploads a commit, and resolves and downloads files.

Built on werkzeug (routing, requests, a threaded WSGI server on 127.0.0.1, port chosen by the OS). Repos live in
memory as git-like history: every branch points to a commit, every commit holds a full tree (path -> blob), and a
commit request builds the new tree completely before it moves the branch, so an interrupted push leaves the branch
where it was. Endpoints (as on huggingface.co):

    POST /api/repos/create                                      create a model repo (409 if it exists)
    POST /api/validate-yaml                                     a README's YAML metadata (model-index checked)
    GET  /api/whoami-v2                                         the token's user
    POST /api/models/{repo}/preupload/{rev}                     uploadMode ("regular" | "lfs") and shouldIgnore
    POST /{repo}.git/info/lfs/objects/batch                     LFS batch: upload + verify actions (basic transfer)
    PUT  /lfs/{repo}/{oid}?sig=...                              LFS upload (signed URL, like S3's; no auth header)
    POST /lfs/{repo}/verify                                     LFS verify
    POST /api/models/{repo}/commit/{rev}                        NDJSON header/file/lfsFile/deletedFile lines
    POST /api/models/{repo}/branch/{branch}                     create a branch (startingPoint optional)
    GET  /api/models/{repo}/refs                                branches
    GET  /api/models/{repo}[/revision/{rev}]                    id, sha, private, siblings
    GET  /api/models/{repo}/tree/{rev}[/{path}]                 folder listing
    HEAD|GET /{repo}/resolve/{rev}/{path}                       X-Repo-Commit, ETag / X-Linked-Etag, sizes

Private repos answer 401 with `X-Error-Code: RepoNotFound` to requests without the right token (as the Hub does, so
that their existence does not leak); writes always need the token; unknown revisions and files answer 404 with
`X-Error-Code: RevisionNotFound` / `EntryNotFound`. `requests` records every call, for tests that check that
nothing was uploaded.
"""

import base64
import contextlib
import hashlib
import json
import re
import secrets
import threading
import time
from dataclasses import dataclass, field

import yaml
from werkzeug.exceptions import HTTPException
from werkzeug.routing import Map, Rule
from werkzeug.serving import make_server
from werkzeug.wrappers import Request, Response

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".onnx", ".png", ".jpg", ".msgpack", ".h5", ".gguf")
LFS_MIN_SIZE = 10 * 1024 * 1024  # larger files go through LFS whatever their name
GITATTRIBUTES = "".join(f"*{suffix} filter=lfs diff=lfs merge=lfs -text\n" for suffix in LFS_SUFFIXES)
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")


@dataclass
class Blob:
    data: bytes
    lfs: bool

    @property
    def sha256(self):
        return hashlib.sha256(self.data).hexdigest()

    @property
    def git_sha(self):  # git's blob id
        return hashlib.sha1(b"blob %d\0" % len(self.data) + self.data).hexdigest()


@dataclass
class Commit:
    sha: str
    parent: str | None
    summary: str
    tree: dict  # path -> Blob


@dataclass
class Repo:
    repo_id: str
    private: bool
    branches: dict = field(default_factory=dict)  # name -> commit sha
    commits: dict = field(default_factory=dict)  # sha -> Commit
    lfs: dict = field(default_factory=dict)  # oid -> bytes (uploaded, verified or not)

    def commit(self, branch, tree, summary):
        parent = self.branches.get(branch)
        digest = hashlib.sha1(f"{parent}\n{summary}\n{time.time_ns()}\n".encode())
        for path in sorted(tree):
            digest.update(f"{path}\0{tree[path].git_sha}\n".encode())
        sha = digest.hexdigest()
        self.commits[sha] = Commit(sha, parent, summary, dict(tree))
        self.branches[branch] = sha
        return sha

    def resolve(self, revision):
        """Commit of a branch name or of a full commit sha; None if neither."""
        if revision in self.branches:
            return self.commits[self.branches[revision]]
        return self.commits.get(revision)


class HubError(HTTPException):
    """An error answer in the Hub's shape: JSON body {"error": message} and, where the Hub sends one, X-Error-Code."""

    def __init__(self, status, message, error_code=None):
        super().__init__(description=message)
        self.code, self.message, self.error_code = status, message, error_code

    def get_response(self, environ=None, scope=None):
        headers = {"X-Error-Message": self.message}
        if self.error_code:
            headers["X-Error-Code"] = self.error_code
        return Response(json.dumps({"error": self.message}), status=self.code, headers=headers,
                        content_type="application/json")


class HubServer:
    """`with HubServer(token=...) as hub:` serves on `hub.url` until the block ends.

    `user` owns the token; repos are created under it unless an organization is named. `interrupt_lfs_upload`, if
    set to a `threading.Event`, makes every LFS upload signal `lfs_upload_started` and then wait on it (a test kills
    the uploading process meanwhile), and answer 500 once it is set.
    """

    def __init__(self, token="hf_loopback_test_token", user="tester"):
        self.token, self.user = token, user
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str]] = []
        self.lfs_upload_started = threading.Event()
        self.interrupt_lfs_upload: threading.Event | None = None
        self._signatures: dict[str, str] = {}  # oid -> signature of its upload URL
        self._lock = threading.Lock()
        repo = "<ns>/<name>"
        self._rules = Map([
            Rule("/api/whoami-v2", methods=["GET"], endpoint="whoami"),
            Rule("/api/repos/create", methods=["POST"], endpoint="create_repo"),
            Rule("/api/validate-yaml", methods=["POST"], endpoint="validate_yaml"),
            Rule(f"/api/models/{repo}/preupload/<rev>", methods=["POST"], endpoint="preupload"),
            Rule(f"/{repo}.git/info/lfs/objects/batch", methods=["POST"], endpoint="lfs_batch"),
            Rule(f"/lfs/{repo}/verify", methods=["POST"], endpoint="lfs_verify"),
            Rule(f"/lfs/{repo}/<oid>", methods=["PUT"], endpoint="lfs_upload"),
            Rule(f"/api/models/{repo}/commit/<rev>", methods=["POST"], endpoint="commit"),
            Rule(f"/api/models/{repo}/branch/<branch>", methods=["POST"], endpoint="create_branch"),
            Rule(f"/api/models/{repo}/refs", methods=["GET"], endpoint="refs"),
            Rule(f"/api/models/{repo}", methods=["GET"], endpoint="info", defaults={"rev": "main"}),
            Rule(f"/api/models/{repo}/revision/<rev>", methods=["GET"], endpoint="info"),
            Rule(f"/api/models/{repo}/tree/<rev>", methods=["GET"], endpoint="tree", defaults={"path": ""}),
            Rule(f"/api/models/{repo}/tree/<rev>/<path:path>", methods=["GET"], endpoint="tree"),
            Rule(f"/{repo}/resolve/<rev>/<path:path>", methods=["GET", "HEAD"], endpoint="resolve"),
        ], redirect_defaults=False, strict_slashes=False)
        self._server = None

    # ------------------------------------------------------------------------------------------------- lifecycle
    def __enter__(self):
        self._server = make_server("127.0.0.1", 0, self._wsgi, threaded=True)
        self.url = f"http://127.0.0.1:{self._server.server_port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.interrupt_lfs_upload is not None:
            self.interrupt_lfs_upload.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def head(self, repo_id, branch="main"):
        """Commit sha of `branch` in `repo_id` (for tests)."""
        return self.repos[repo_id].branches[branch]

    def files(self, repo_id, revision="main"):
        """{path: bytes} at `revision` (for tests)."""
        return {path: blob.data for path, blob in self.repos[repo_id].resolve(revision).tree.items()}

    # ------------------------------------------------------------------------------------------------- plumbing
    def _wsgi(self, environ, start_response):
        request = Request(environ)
        self.requests.append((request.method, request.path))
        try:
            endpoint, args = self._rules.bind_to_environ(environ).match()
            with self._lock if endpoint != "lfs_upload" else contextlib.nullcontext():
                response = getattr(self, f"_{endpoint}")(request, **args)
        except HTTPException as error:
            response = error if isinstance(error, HubError) else HubError(error.code, error.description)
        return response(environ, start_response)

    def _authorized(self, request):
        header = request.headers.get("Authorization", "")
        if not header:
            return False
        if header != f"Bearer {self.token}":
            raise HubError(401, "Invalid credentials in Authorization header")
        return True

    def _repo(self, request, ns, name, write=False):
        repo_id = f"{ns}/{name}"
        authorized = self._authorized(request)
        if write and not authorized:
            raise HubError(401, "You must be authenticated to write to a repo: pass a token.")
        repo = self.repos.get(repo_id)
        if repo is None or (repo.private and not authorized):
            raise HubError(401 if not authorized else 404, "Repository Not Found", "RepoNotFound")
        return repo

    def _commit_at(self, repo, rev):
        commit = repo.resolve(rev)
        if commit is None:
            raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return commit

    @staticmethod
    def _json(payload, status=200):
        return Response(json.dumps(payload), status=status, content_type="application/json")

    # ------------------------------------------------------------------------------------------------- endpoints
    def _whoami(self, request):
        if not self._authorized(request):
            raise HubError(401, "Invalid credentials in Authorization header")
        return self._json({"type": "user", "name": self.user, "orgs": [],
                           "auth": {"accessToken": {"role": "write", "displayName": "loopback"}}})

    def _create_repo(self, request):
        if not self._authorized(request):
            raise HubError(401, "You must be authenticated to create a repo: pass a token.")
        body = request.get_json()
        if body.get("type", "model") != "model":
            raise HubError(400, f"Only model repos are served here, not {body['type']!r}.")
        repo_id = f"{body.get('organization') or self.user}/{body['name']}"
        if not REPO_ID.match(repo_id):
            raise HubError(400, f"Invalid repo name {repo_id!r}.")
        if repo_id in self.repos:
            return self._json({"error": "You already created this model repo", "url": f"{self.url}/{repo_id}"}, 409)
        # huggingface_hub 0.x sends {"private": bool}, 1.x and later {"visibility": "private" | "public"}
        private = body.get("visibility", "private" if body.get("private") else "public") == "private"
        repo = self.repos[repo_id] = Repo(repo_id, private=private)
        repo.commit("main", {".gitattributes": Blob(GITATTRIBUTES.encode(), lfs=False)}, "initial commit")
        return self._json({"url": f"{self.url}/{repo_id}", "name": repo_id, "id": repo_id})

    def _validate_yaml(self, request):
        content = request.get_json()["content"]
        match = re.match(r"^---\n(.*?)\n---", content, flags=re.DOTALL)
        if not match:
            return self._json({"errors": [], "warnings": [{"message": "empty or missing yaml metadata"}]})
        try:
            metadata = yaml.safe_load(match.group(1)) or {}
        except yaml.YAMLError as error:
            return self._json({"errors": [{"message": f"invalid YAML: {error}"}]}, 400)
        errors = []
        for model in metadata.get("model-index", []):
            if not model.get("name") or not isinstance(model.get("results"), list):
                errors.append({"message": "model-index entries need a name and a results list"})
            for result in model.get("results", []):
                if not {"task", "dataset", "metrics"} <= result.keys() or not all(
                        {"type", "value"} <= metric.keys() for metric in result["metrics"]):
                    errors.append({"message": f"model-index result {result} lacks task/dataset/metrics(type, value)"})
        return self._json({"errors": errors, "warnings": []}, 400 if errors else 200)

    def _preupload(self, request, ns, name, rev):
        repo = self._repo(request, ns, name, write=True)
        if rev not in repo.branches:
            raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        files = []
        for entry in request.get_json()["files"]:
            lfs = entry["path"].endswith(LFS_SUFFIXES) or entry["size"] >= LFS_MIN_SIZE
            files.append({"path": entry["path"], "uploadMode": "lfs" if lfs else "regular",
                          "shouldIgnore": entry["path"].startswith(".git/")})
        return self._json({"files": files, "commitOid": repo.branches[rev]})

    def _lfs_batch(self, request, ns, name):
        repo = self._repo(request, ns, name, write=True)
        body = request.get_json()
        if body.get("operation") != "upload" or "basic" not in body.get("transfers", ["basic"]):
            raise HubError(400, "Only the 'upload' operation with the 'basic' transfer is served here.")
        objects = []
        for obj in body["objects"]:
            entry = {"oid": obj["oid"], "size": obj["size"]}
            if obj["oid"] not in repo.lfs:
                signature = self._signatures.setdefault(obj["oid"], secrets.token_hex(8))
                base = f"{self.url}/lfs/{repo.repo_id}"
                entry["actions"] = {
                    "upload": {"href": f"{base}/{obj['oid']}?sig={signature}"},
                    "verify": {"href": f"{base}/verify"},
                }
            objects.append(entry)
        return self._json({"transfer": "basic", "objects": objects})

    def _lfs_upload(self, request, ns, name, oid):
        if self._signatures.get(oid) != request.args.get("sig"):
            raise HubError(403, "Upload URL signature does not match.")
        data = request.get_data()
        if self.interrupt_lfs_upload is not None:
            self.lfs_upload_started.set()
            self.interrupt_lfs_upload.wait(timeout=60)
            raise HubError(500, "upload interrupted")
        if hashlib.sha256(data).hexdigest() != oid:
            raise HubError(400, f"Uploaded content does not hash to {oid}.")
        with self._lock:
            self.repos[f"{ns}/{name}"].lfs[oid] = data
        return Response(status=200)

    def _lfs_verify(self, request, ns, name):
        repo = self._repo(request, ns, name, write=True)
        body = request.get_json()
        data = repo.lfs.get(body["oid"])
        if data is None or len(data) != body["size"]:
            raise HubError(404, f"LFS object {body['oid']} of size {body['size']} was not uploaded.")
        return self._json({"success": True})

    def _commit(self, request, ns, name, rev):
        repo = self._repo(request, ns, name, write=True)
        if request.args.get("create_pr"):
            raise HubError(400, "Pull requests are not served here.")
        if rev not in repo.branches:
            raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        lines = [json.loads(line) for line in request.get_data().decode().splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "The first NDJSON line must be the header.")
        header = lines[0]["value"]
        if header.get("parentCommit") and header["parentCommit"] != repo.branches[rev]:
            raise HubError(412, f"Parent commit {header['parentCommit']} is not the head of {rev}.")
        tree = dict(repo.resolve(rev).tree)  # built completely before the branch moves
        for line in lines[1:]:
            key, value = line["key"], line["value"]
            if key == "file":
                if value.get("encoding") != "base64":
                    raise HubError(400, "file lines must carry base64 content.")
                tree[value["path"]] = Blob(base64.b64decode(value["content"]), lfs=False)
            elif key == "lfsFile":
                if value["oid"] not in repo.lfs:
                    raise HubError(422, f"LFS object {value['oid']} for {value['path']} was never uploaded.")
                tree[value["path"]] = Blob(repo.lfs[value["oid"]], lfs=True)
            elif key == "deletedFile":
                if tree.pop(value["path"], None) is None:
                    raise HubError(404, f"Cannot delete {value['path']}: no such file.", "EntryNotFound")
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                tree = {p: b for p, b in tree.items() if not p.startswith(prefix)}
            else:
                raise HubError(400, f"Unknown commit operation {key!r}.")
        sha = repo.commit(rev, tree, header.get("summary", ""))
        return self._json({"success": True, "commitOid": sha, "commitUrl": f"{self.url}/{repo.repo_id}/commit/{sha}",
                           "pullRequestUrl": None})

    def _create_branch(self, request, ns, name, branch):
        repo = self._repo(request, ns, name, write=True)
        if branch in repo.branches:
            raise HubError(409, f"Reference refs/heads/{branch} already exists")
        body = request.get_json(silent=True) or {}
        start = self._commit_at(repo, body.get("startingPoint") or "main")
        repo.branches[branch] = start.sha
        return self._json({})

    def _refs(self, request, ns, name):
        repo = self._repo(request, ns, name)
        branches = [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": sha} for b, sha in repo.branches.items()]
        return self._json({"branches": branches, "tags": [], "converts": []})

    def _info(self, request, ns, name, rev):
        repo = self._repo(request, ns, name)
        commit = self._commit_at(repo, rev)
        blobs = request.args.get("blobs") in ("1", "true", "True")
        siblings = []
        for path, blob in sorted(commit.tree.items()):
            sibling = {"rfilename": path}
            if blobs:
                sibling.update(size=len(blob.data), blobId=blob.git_sha)
                if blob.lfs:
                    sibling["lfs"] = {"sha256": blob.sha256, "size": len(blob.data), "pointerSize": 134}
            siblings.append(sibling)
        return self._json({"_id": repo.repo_id, "id": repo.repo_id, "modelId": repo.repo_id, "author": ns,
                           "sha": commit.sha, "private": repo.private, "disabled": False, "gated": False,
                           "lastModified": "2026-01-01T00:00:00.000Z", "tags": [], "downloads": 0, "likes": 0,
                           "siblings": siblings})

    def _tree(self, request, ns, name, rev, path):
        repo = self._repo(request, ns, name)
        commit = self._commit_at(repo, rev)
        prefix = path.rstrip("/") + "/" if path else ""
        entries, folders = [], set()
        for file, blob in sorted(commit.tree.items()):
            if not file.startswith(prefix):
                continue
            rest = file[len(prefix):]
            if "/" in rest:
                folders.add(prefix + rest.split("/")[0])
                continue
            entry = {"type": "file", "path": file, "size": len(blob.data), "oid": blob.git_sha}
            if blob.lfs:
                entry["lfs"] = {"oid": blob.sha256, "size": len(blob.data), "pointerSize": 134}
            entries.append(entry)
        if prefix and not entries and not folders:
            raise HubError(404, f"{path} does not exist at {rev}", "EntryNotFound")
        entries += [{"type": "directory", "path": folder, "oid": "0" * 40, "size": 0} for folder in sorted(folders)]
        return self._json(entries)

    def _resolve(self, request, ns, name, rev, path):
        repo = self._repo(request, ns, name)
        commit = self._commit_at(repo, rev)
        blob = commit.tree.get(path)
        if blob is None:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound")
        headers = {"X-Repo-Commit": commit.sha, "ETag": f'"{blob.git_sha}"', "Content-Length": str(len(blob.data))}
        if blob.lfs:
            headers.update({"X-Linked-Etag": f'"{blob.sha256}"', "X-Linked-Size": str(len(blob.data))})
        body = b"" if request.method == "HEAD" else blob.data
        response = Response(body, headers=headers, content_type="application/octet-stream")
        response.headers["Content-Length"] = str(len(blob.data))
        return response
