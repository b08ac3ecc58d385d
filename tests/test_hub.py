"""nanoalign.plumbing.hub: alias / local dir / HF-cache resolution, and downloads from a fake hub on 127.0.0.1.

The fake hub mimics huggingface.co's `resolve` endpoint: small files come back directly with `X-Repo-Commit`;
`.safetensors` files come back as a 302 to a "CDN" path, with the size and sha256 only on the redirect
(`X-Linked-Size`, `X-Linked-Etag`), as the real hub does for LFS files. Every request goes to 127.0.0.1 only.
"""

import hashlib
import http.server
import json
import os
import re
import socket
import threading

import pytest

from nanoalign.plumbing import hub

COMMIT = "0123456789abcdef0123456789abcdef01234567"
REPO = "Org/Tiny"
WEIGHTS = bytes(range(256)) * 700 + os.urandom(1000)  # 180 KB, several 4 KiB chunks
FILES = {
    "config.json": json.dumps({"model_type": "llama", "hidden_size": 32}).encode(),
    "model.safetensors": WEIGHTS,
    "tokenizer.json": b'{"version": "1.0"}',
    "tokenizer_config.json": b'{"eos_token": "</s>"}',
    # no generation_config.json: the hub answers 404 and resolve_model must accept that
}


class FakeHub(http.server.ThreadingHTTPServer):
    """`GET /{repo}/resolve/{rev}/{file}` over `files`; `opts` switches on misbehaviour for the error tests."""

    def __init__(self, files):
        super().__init__(("127.0.0.1", 0), Handler)
        self.files = {f"{REPO}/{k}": v for k, v in files.items()}
        self.opts = {}  # x_linked_size, sha, extra_length, ignore_range, commit (the X-Repo-Commit to send)
        self.requests = []  # (path, Range header, Authorization header)


class Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_GET(self):
        srv, path = self.server, self.path
        srv.requests.append((path, self.headers.get("Range"), self.headers.get("Authorization")))
        if path.startswith("/cdn/"):
            return self.serve(srv.files[path[len("/cdn/"):]], extra_length=srv.opts.get("extra_length", 0))
        m = re.match(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$", path)
        key = m and f"{m[1]}/{m[3]}"
        if key not in srv.files:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            return self.end_headers()
        data, commit = srv.files[key], m[2] if re.fullmatch("[0-9a-f]{40}", m[2]) else COMMIT
        commit = srv.opts.get("commit", commit)
        if key.endswith(".safetensors"):  # LFS: redirect, with the file's size and sha256 on the redirect
            self.send_response(302)
            self.send_header("Location", f"/cdn/{key}")
            self.send_header("X-Repo-Commit", commit)
            self.send_header("X-Linked-Size", str(srv.opts.get("x_linked_size", len(data))))
            self.send_header("X-Linked-Etag", '"%s"' % srv.opts.get("sha", hashlib.sha256(data).hexdigest()))
            self.send_header("Content-Length", "0")
            return self.end_headers()
        self.serve(data, {"X-Repo-Commit": commit, "ETag": '"%s"' % hashlib.sha1(data).hexdigest()})

    def serve(self, data, headers=None, extra_length=0):
        opts, rng, start = self.server.opts, self.headers.get("Range"), 0
        if rng and not opts.get("ignore_range"):
            start = int(re.match(r"bytes=(\d+)-$", rng)[1])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Length", "0")
                return self.end_headers()
        self.send_response(206 if start else 200)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(data) - start + extra_length))
        self.end_headers()
        self.wfile.write(data[start:])  # HTTP/1.0: the connection closes after this, so a lie ends short


def start_hub(files, monkeypatch):
    server = FakeHub(files)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    return server


@pytest.fixture(autouse=True)
def isolated_env(tmp_path, monkeypatch):
    """Own cache, no token, not offline, no proxy (so urllib talks to 127.0.0.1 directly), small chunks."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    for var in ("HF_TOKEN", "HF_HUB_OFFLINE", "http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY",
                "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setattr(hub, "CHUNK", 4096)


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    server = start_hub(FILES, monkeypatch)
    yield server
    server.shutdown()
    server.server_close()


def snapshot_dir(tmp_path, repo=REPO, commit=COMMIT):
    return tmp_path / "cache" / ("models--" + repo.replace("/", "--")) / "snapshots" / commit


def make_snapshot(snap, files=FILES):
    snap.mkdir(parents=True)
    for name, data in files.items():
        (snap / name).write_bytes(data)
    (snap.parent.parent / ".no_exist" / snap.name).mkdir(parents=True, exist_ok=True)
    (snap.parent.parent / ".no_exist" / snap.name / "generation_config.json").touch()


def no_network(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("resolve_model went to the network although the cache was complete")
    monkeypatch.setattr(hub, "open_url", fail)


# ----------------------------------------------------------------------------------------------- resolution


def test_aliases_name_hf_repo_ids():
    """The alias table matches the hub's spelling of the repo ids (case matters on the hub)."""
    assert hub.ALIASES["qwen2.5-0.5b"] == "Qwen/Qwen2.5-0.5B"
    assert hub.ALIASES["qwen2.5-7b-instruct"] == "Qwen/Qwen2.5-7B-Instruct"
    assert hub.ALIASES["llama-3.2-1b"] == "meta-llama/Llama-3.2-1B"
    assert hub.ALIASES["llama-3.2-3b-instruct"] == "meta-llama/Llama-3.2-3B-Instruct"
    assert all(hub.REPO_ID.match(r) for r in hub.ALIASES.values())


def test_local_dir_is_returned_as_is(tmp_path, monkeypatch):
    """A directory with config.json wins over everything else and needs no network."""
    no_network(monkeypatch)
    d = tmp_path / "my-model"
    d.mkdir()
    (d / "config.json").write_text("{}")
    assert hub.resolve_model(d) == d
    assert hub.resolve_model(str(d)) == d


def test_local_dir_without_config_is_a_clear_error(tmp_path):
    """A directory lacking config.json is rejected with a message naming the directory and the missing file."""
    d = tmp_path / "empty-model"
    d.mkdir()
    with pytest.raises(FileNotFoundError, match="config.json") as e:
        hub.resolve_model(d)
    assert str(d) in str(e.value) and "\n" not in str(e.value)


def test_unknown_name_lists_aliases():
    """A name that is no directory, alias or Org/Name says so and lists the aliases."""
    with pytest.raises(ValueError, match="unknown model 'qwen-9000'") as e:
        hub.resolve_model("qwen-9000")
    assert "qwen2.5-0.5b" in str(e.value) and "llama-3.2-1b-instruct" in str(e.value)


def test_missing_path_is_file_not_found(tmp_path):
    """Something that looks like a path (./x, /a/b/c) and does not exist is not mistaken for a repo id."""
    with pytest.raises(FileNotFoundError, match="no such model directory"):
        hub.resolve_model(str(tmp_path / "nope" / "model"))


def test_alias_resolves_through_refs_main(tmp_path, monkeypatch):
    """alias -> repo id -> models--Org--Name/refs/main -> snapshots/<commit>, ignoring other snapshots."""
    no_network(monkeypatch)
    repo = tmp_path / "cache" / "models--Qwen--Qwen2.5-0.5B"
    make_snapshot(repo / "snapshots" / COMMIT)
    make_snapshot(repo / "snapshots" / "oldcommit")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    assert hub.resolve_model("qwen2.5-0.5b") == repo / "snapshots" / COMMIT
    assert hub.resolve_model("Qwen/Qwen2.5-0.5B") == repo / "snapshots" / COMMIT


def test_single_snapshot_without_refs_and_hf_home(tmp_path, monkeypatch):
    """Without refs/main the only snapshot is used; without $HF_HUB_CACHE the cache is $HF_HOME/hub."""
    no_network(monkeypatch)
    monkeypatch.delenv("HF_HUB_CACHE")
    snap = tmp_path / "hf_home" / "hub" / "models--meta-llama--Llama-3.2-1B" / "snapshots" / "abc"
    make_snapshot(snap)
    assert hub.resolve_model("llama-3.2-1b") == snap


def test_sharded_snapshot_needs_every_shard(tmp_path, monkeypatch):
    """A snapshot with an index counts as complete only when every shard it lists is present."""
    files = {k: v for k, v in FILES.items() if k != "model.safetensors"}
    files["model.safetensors.index.json"] = json.dumps(
        {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}).encode()
    files["model-00001-of-00002.safetensors"] = b"x"
    snap = snapshot_dir(tmp_path)
    make_snapshot(snap, files)
    assert hub.missing_files(snap) == ["model-00002-of-00002.safetensors"]
    (snap / "model-00002-of-00002.safetensors").write_bytes(b"y")
    assert hub.missing_files(snap) == []
    no_network(monkeypatch)
    assert hub.resolve_model(REPO) == snap


def test_embedded_alias_calls_ensure_smollm2(tmp_path, monkeypatch):
    """smollm2-135m(-instruct) is the embedded model: resolved by embedded.ensure_smollm2, not the hub."""
    no_network(monkeypatch)
    monkeypatch.setattr("nanoalign.plumbing.embedded.ensure_smollm2", lambda: tmp_path / "smol")
    assert hub.resolve_model("smollm2-135m") == tmp_path / "smol"
    assert hub.resolve_model("SmolLM2-135M-Instruct") == tmp_path / "smol"


# ------------------------------------------------------------------------------------------------ downloads


def test_full_download_into_cache_layout(tmp_path, fake_hub, monkeypatch):
    """Files land byte-exact in snapshots/<X-Repo-Commit>/, refs/main names the commit, the optional 404 is
    remembered in .no_exist, the token goes to the hub but not along the redirect, and a second call is offline."""
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    snap = hub.resolve_model(REPO)
    assert snap == snapshot_dir(tmp_path)
    for name, data in FILES.items():
        assert (snap / name).read_bytes() == data, name
    assert not list(snap.glob("*.incomplete"))
    assert (snap.parent.parent / "refs" / "main").read_text() == COMMIT
    assert (snap.parent.parent / ".no_exist" / COMMIT / "generation_config.json").exists()
    auth = {path: a for path, _, a in fake_hub.requests}
    assert auth[f"/{REPO}/resolve/main/model.safetensors"] == "Bearer hf_secret"
    assert auth[f"/cdn/{REPO}/model.safetensors"] is None
    n = len(fake_hub.requests)
    assert hub.resolve_model(REPO) == snap and len(fake_hub.requests) == n


def test_sharded_download(tmp_path, monkeypatch):
    """With model.safetensors.index.json on the hub, the index and every shard it lists are downloaded."""
    files = {k: v for k, v in FILES.items() if k != "model.safetensors"}
    shards = {"model-00001-of-00002.safetensors": os.urandom(5000),
              "model-00002-of-00002.safetensors": os.urandom(7000)}
    index = {"weight_map": {"w1": "model-00001-of-00002.safetensors", "w2": "model-00002-of-00002.safetensors"}}
    files["model.safetensors.index.json"] = json.dumps(index).encode()
    server = start_hub({**files, **shards}, monkeypatch)
    try:
        snap = hub.resolve_model(REPO)
    finally:
        server.shutdown()
        server.server_close()
    for name, data in {**files, **shards}.items():
        assert (snap / name).read_bytes() == data, name
    assert not (snap / "model.safetensors").exists()


def test_cached_weights_are_completed_at_their_commit(tmp_path, fake_hub):
    """A cached snapshot with config and weights but no tokenizer files (what loading only the model leaves) gets
    the missing files from its own commit; the weights are not fetched again even though main has moved on."""
    old = "f" * 40
    snap = snapshot_dir(tmp_path, commit=old)
    snap.mkdir(parents=True)
    (snap / "config.json").write_bytes(FILES["config.json"])
    (snap / "model.safetensors").write_bytes(WEIGHTS)
    assert hub.resolve_model(REPO) == snap
    assert (snap / "tokenizer.json").read_bytes() == FILES["tokenizer.json"]
    paths = [p for p, _, _ in fake_hub.requests]
    assert f"/{REPO}/resolve/{old}/tokenizer.json" in paths
    assert not any("model.safetensors" in p and "index" not in p for p in paths)
    assert not snapshot_dir(tmp_path).exists()


def test_resume_partial_download_with_range(tmp_path, fake_hub):
    """A pre-existing .incomplete holding the first half is continued with `Range: bytes=<half>-`."""
    snap = snapshot_dir(tmp_path)
    snap.mkdir(parents=True)
    half = len(WEIGHTS) // 2
    (snap / "model.safetensors.incomplete").write_bytes(WEIGHTS[:half])
    assert hub.resolve_model(REPO) == snap
    assert (snap / "model.safetensors").read_bytes() == WEIGHTS
    assert (f"/cdn/{REPO}/model.safetensors", f"bytes={half}-", None) in fake_hub.requests
    assert not (snap / "model.safetensors.incomplete").exists()


def test_resume_when_server_ignores_range(tmp_path, fake_hub):
    """A server answering 200 (whole file) to a Range request is handled by starting over, not by appending."""
    fake_hub.opts["ignore_range"] = True
    snap = snapshot_dir(tmp_path)
    snap.mkdir(parents=True)
    (snap / "model.safetensors.incomplete").write_bytes(WEIGHTS[:1000])
    hub.resolve_model(REPO)
    assert (snap / "model.safetensors").read_bytes() == WEIGHTS


def test_partial_as_long_as_the_file_starts_over(tmp_path, fake_hub):
    """A .incomplete that is already full length gets HTTP 416 for its Range; the download restarts from 0."""
    snap = snapshot_dir(tmp_path)
    snap.mkdir(parents=True)
    (snap / "model.safetensors.incomplete").write_bytes(b"z" * len(WEIGHTS))
    hub.resolve_model(REPO)
    assert (snap / "model.safetensors").read_bytes() == WEIGHTS
    ranges = [r for p, r, _ in fake_hub.requests if p == f"/cdn/{REPO}/model.safetensors"]
    assert ranges == [f"bytes={len(WEIGHTS)}-", None]


def test_wrong_announced_size_is_rejected(tmp_path, fake_hub):
    """X-Linked-Size disagreeing with the bytes received: clear one-line error, no final file, no partial."""
    fake_hub.opts["x_linked_size"] = len(WEIGHTS) + 10
    with pytest.raises(hub.HubError, match="model.safetensors: got .* bytes but the server announced") as e:
        hub.resolve_model(REPO)
    assert "\n" not in str(e.value)
    snap = snapshot_dir(tmp_path)
    assert not (snap / "model.safetensors").exists()
    assert not (snap / "model.safetensors.incomplete").exists()


def test_truncated_transfer_keeps_partial_for_resume(tmp_path, fake_hub):
    """A Content-Length larger than what arrives: error, no final file; the next run resumes to the right bytes."""
    fake_hub.opts["extra_length"] = 5000
    with pytest.raises(hub.HubError, match="interrupted"):
        hub.resolve_model(REPO)
    snap = snapshot_dir(tmp_path)
    assert not (snap / "model.safetensors").exists()
    part = (snap / "model.safetensors.incomplete").read_bytes()
    assert part == WEIGHTS[:len(part)]
    fake_hub.opts.clear()
    hub.resolve_model(REPO)
    assert (snap / "model.safetensors").read_bytes() == WEIGHTS


def test_wrong_sha256_is_rejected(tmp_path, fake_hub):
    """Bytes whose sha256 differs from X-Linked-Etag: clear error, neither final nor partial file left."""
    fake_hub.opts["sha"] = "ab" * 32
    with pytest.raises(hub.HubError, match="sha256 mismatch") as e:
        hub.resolve_model(REPO)
    assert "\n" not in str(e.value)
    snap = snapshot_dir(tmp_path)
    assert not (snap / "model.safetensors").exists()
    assert not (snap / "model.safetensors.incomplete").exists()


def test_offline_is_one_line_and_makes_no_request(fake_hub, monkeypatch):
    """HF_HUB_OFFLINE=1 or offline=True: one line telling the user to pass a local directory; no request made."""
    with pytest.raises(hub.Unreachable) as e:
        hub.resolve_model("Org/Tiny", offline=True)
    assert str(e.value) == ("cannot download Org/Tiny (offline); download it elsewhere and pass a local directory: "
                            "--model /path/to/dir")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(hub.Unreachable, match="cannot download Qwen/Qwen2.5-0.5B \\(offline\\)"):
        hub.resolve_model("qwen2.5-0.5b")
    assert fake_hub.requests == []


def test_unreachable_hub_is_one_line(monkeypatch):
    """A refused connection (nothing listens on the port) reads like offline mode, in one line."""
    with socket.socket() as s:  # a port that was free a moment ago and has no listener now
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    with pytest.raises(hub.Unreachable, match=r"cannot download Org/Tiny \(network unreachable: .*\); download it "
                                              r"elsewhere and pass a local directory: --model /path/to/dir$") as e:
        hub.resolve_model(REPO)
    assert "\n" not in str(e.value)


def test_offline_falls_back_to_cache_with_config_and_weights(tmp_path):
    """Offline, a cached snapshot with config and weights but without the optional files is still used."""
    snap = snapshot_dir(tmp_path)
    snap.mkdir(parents=True)
    (snap / "config.json").write_bytes(FILES["config.json"])
    (snap / "model.safetensors").write_bytes(WEIGHTS)
    assert hub.resolve_model(REPO, offline=True) == snap
    (snap / "model.safetensors").unlink()
    with pytest.raises(hub.Unreachable, match="offline"):
        hub.resolve_model(REPO, offline=True)


def test_repo_without_config_is_a_clear_error(fake_hub):
    """A repo id the hub has no config.json for gives a one-line FileNotFoundError naming the repo."""
    with pytest.raises(FileNotFoundError, match="Org/Missing has no config.json"):
        hub.resolve_model("Org/Missing")


# ------------------------------------------------------------------------------ names from files are untrusted


def files_under(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


@pytest.mark.parametrize("commit", ["../../../../escaped", "/tmp/escaped-abs", "main", "abc123", "A" * 40,
                                    "0123456789abcdef0123456789abcdef0123456/"])
def test_commit_header_must_be_40_hex(tmp_path, fake_hub, commit):
    """An X-Repo-Commit that is not 40 lower-case hex digits is refused before anything is written: before the fix
    `../../../../escaped` put config.json outside the cache (the header became a directory name)."""
    fake_hub.opts["commit"] = commit
    with pytest.raises(hub.HubError, match="not a 40-hex commit") as e:
        hub.resolve_model(REPO)
    assert "\n" not in str(e.value) and REPO in str(e.value)
    assert files_under(tmp_path) == []  # nothing in the cache, nothing beside it
    assert not os.path.exists("/tmp/escaped-abs")


def test_commit_header_is_accepted_when_40_hex(tmp_path, fake_hub):
    """The check does not refuse a real commit: another 40-hex header names the snapshot directory."""
    fake_hub.opts["commit"] = "f" * 40
    assert hub.resolve_model(REPO) == snapshot_dir(tmp_path, commit="f" * 40)


def sharded_files(shard_name):
    files = {k: v for k, v in FILES.items() if k != "model.safetensors"}
    index = {"weight_map": {"w1": "model-00001-of-00002.safetensors", "w2": shard_name}}
    files["model.safetensors.index.json"] = json.dumps(index).encode()
    files["model-00001-of-00002.safetensors"] = os.urandom(3000)
    files[shard_name] = os.urandom(3000)
    return files


@pytest.mark.parametrize("shard", ["../../../../evil.safetensors", "ABSOLUTE", "sub/../../evil.safetensors",
                                   "..\\..\\evil.safetensors", "C:evil.safetensors"])
def test_index_naming_a_file_outside_the_snapshot_is_refused(tmp_path, monkeypatch, shard):
    """A hub whose model.safetensors.index.json names `../..`, an absolute path or a drive gets a one-line
    ValueError naming the index, and no request for that shard is made: before the fix the shard was written
    wherever the name pointed (for an absolute name, anywhere on the disk)."""
    if shard == "ABSOLUTE":
        shard = str(tmp_path / "outside" / "evil.safetensors")
    server = start_hub(sharded_files(shard), monkeypatch)
    try:
        with pytest.raises(ValueError, match="model.safetensors.index.json: .* is not a file name inside") as e:
            hub.resolve_model(REPO)
        requested = [p for p, _, _ in server.requests]
    finally:
        server.shutdown()
        server.server_close()
    assert "\n" not in str(e.value)
    assert not any("evil" in p for p in requested), requested
    assert [f for f in files_under(tmp_path) if "evil" in f] == []
    with pytest.raises(ValueError, match="is not a file name inside"):  # the cached index stays refused
        hub.resolve_model(REPO, offline=True)


def test_index_with_a_shard_in_a_subdirectory_is_downloaded(tmp_path, monkeypatch):
    """A shard name with a directory that stays inside the snapshot is legitimate and is fetched into it."""
    files = sharded_files("weights/model-00002-of-00002.safetensors")
    server = start_hub(files, monkeypatch)
    try:
        snap = hub.resolve_model(REPO)
    finally:
        server.shutdown()
        server.server_close()
    assert (snap / "weights" / "model-00002-of-00002.safetensors").read_bytes() == \
        files["weights/model-00002-of-00002.safetensors"]


@pytest.mark.parametrize("index", ["{not json", "[1, 2]", '{"weight_map": ["a.safetensors"]}',
                                   '{"weight_map": {"w": 7}}', '{"metadata": {}}'])
def test_unreadable_cached_index_is_one_line(tmp_path, monkeypatch, index):
    """A damaged index in the cache is a ValueError naming it, not a JSONDecodeError / KeyError / TypeError."""
    no_network(monkeypatch)
    snap = snapshot_dir(tmp_path)
    make_snapshot(snap, {"config.json": FILES["config.json"], "model.safetensors.index.json": index.encode()})
    with pytest.raises(ValueError, match="model.safetensors.index.json") as e:
        hub.resolve_model(REPO)
    assert "\n" not in str(e.value)


def test_ref_that_is_not_a_commit_is_refused(tmp_path, monkeypatch):
    """refs/main is read from disk and becomes a path: a ref holding `../../..` is refused, naming the ref file."""
    no_network(monkeypatch)
    repo = tmp_path / "cache" / ("models--" + REPO.replace("/", "--"))
    make_snapshot(repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("../../..")
    with pytest.raises(ValueError, match="refs/main: holds '../../..', not a 40-hex commit"):
        hub.resolve_model(REPO)


@pytest.mark.parametrize("name", ["./missing-dir", "../missing-dir", ".", "models/org/name", "~/no-such-model",
                                  "/no/such/model"])
def test_a_name_written_as_a_path_is_never_sent_to_the_hub(tmp_path, fake_hub, monkeypatch, name):
    """`./missing-dir` matched the repo-id pattern (`.` / `missing-dir`) and was requested from the hub; a name
    that looks like a path is now a one-line FileNotFoundError saying the directory does not exist."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    if name == ".":
        with pytest.raises(FileNotFoundError, match="has no config.json"):  # "." exists: it just is no model
            hub.resolve_model(name)
    else:
        with pytest.raises(FileNotFoundError, match="no such model directory: .* does not exist") as e:
            hub.resolve_model(name)
        assert "\n" not in str(e.value) and name in str(e.value)
    assert fake_hub.requests == []


def test_a_file_given_as_model_is_named(tmp_path, fake_hub, monkeypatch):
    """A path to a file (say the weights themselves) says it is a file and asks for the directory."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match=r"\./model.safetensors is a file; pass the model directory"):
        hub.resolve_model("./model.safetensors")
    assert fake_hub.requests == []


def test_load_model_with_a_missing_directory(tmp_path, fake_hub, monkeypatch):
    """nanoalign.plumbing.load_model('./missing-dir') is the same one line, with no request to the hub."""
    import nanoalign
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such model directory: ./missing-dir"):
        nanoalign.plumbing.load_model("./missing-dir")
    assert fake_hub.requests == []
