"""Issue 7, security: no remote code unless asked, no credential anywhere in outputs or logs,
sample ids never steer output paths, and only allowed URL schemes (data and model) are touched.

The HTML report's escaping is tested in tests/pipeline/test_report.py.
"""
from __future__ import annotations

import io
import json
import os
import re
import secrets as pysecrets
from urllib.parse import quote

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fsspec.implementations.memory import MemoryFileSystem
from jobutil import FAST, _results, _run

from dcam.actors import scenes
from dcam.actors.models import load_backend
from dcam.actors.models.loading import CheckpointError
from dcam.actors.models.tiny_dmllm import TinyDMLLM, TinyDMLLMConfig, WordTokenizer
from dcam.pipeline import storage
from dcam.pipeline.storage import DEFAULT_ALLOWED_SCHEMES, SchemeNotAllowedError
from dcam.pipeline.synth import png_bytes, write_corpus

SAFE_NAME = re.compile(r"[A-Za-z0-9._-]+")
WITH_REPORT = [o for o in FAST if not o.startswith("report.")] + ["report.enabled=true"]


# ----------------------------------------------------------------------------------------------- helpers

def tiny_ckpt(path, auto_map_in: str | None = "config.json") -> str:
    """A random tiny checkpoint; `auto_map_in` names the config file that asks for custom code. The
    code it names writes a marker file when imported, so executing it would be visible."""
    path.mkdir(parents=True, exist_ok=True)
    cfg = TinyDMLLMConfig()
    TinyDMLLM(cfg).save_pretrained(str(path))
    WordTokenizer(cfg.vocab).save_pretrained(str(path))
    marker = path / "REMOTE_CODE_RAN"
    (path / "evil_modeling.py").write_text(f"open({str(marker)!r}, 'w').write('pwned')\n")
    if auto_map_in:
        f = path / auto_map_in
        doc = json.loads(f.read_text()) if f.exists() else {}
        doc["auto_map"] = {"AutoConfig": "evil_modeling.EvilConfig", "AutoModel": "evil_modeling.EvilModel"}
        f.write_text(json.dumps(doc))
    return str(path)


@pytest.fixture
def no_ray_work(monkeypatch):
    """Record (and refuse) any attempt of run_job to start Ray or the streaming execution."""
    import dcam.pipeline.job as job

    calls = []

    def refuse(name):
        def f(*a, **k):
            calls.append(name)
            raise AssertionError(f"{name} must not run")
        return f

    monkeypatch.setattr(job, "ensure_ray", refuse("ensure_ray"))
    monkeypatch.setattr(job, "execute", refuse("execute"))
    return calls


class _Reached(Exception):
    """Raised by a stubbed `execute`: every check before the Ray work passed."""


# ----------------------------------------------------------------------------------------------- remote code

def test_remote_code_refused_by_default_and_loaded_only_when_trusted(tmp_path):
    ck = tiny_ckpt(tmp_path / "ck")
    for cfg in ({"backend": "tiny", "source": ck, "device": "cpu"},
                {"backend": "tiny", "source": ck, "device": "cpu", "trust_remote_code": False}):
        with pytest.raises(CheckpointError, match="trust_remote_code") as ei:
            load_backend(cfg)
        assert "auto_map" in str(ei.value) and "config.json" in str(ei.value)
    be = load_backend({"backend": "tiny", "source": ck, "device": "cpu", "trust_remote_code": True})
    assert isinstance(be.model, TinyDMLLM) and be.tok.vocab == TinyDMLLMConfig().vocab
    # the tiny backend never needs the checkpoint's code, so even a trusted load does not run it
    assert not (tmp_path / "ck" / "REMOTE_CODE_RAN").exists()


def test_remote_code_in_tokenizer_config_is_refused_too(tmp_path):
    ck = tiny_ckpt(tmp_path / "ck", auto_map_in="tokenizer_config.json")
    with pytest.raises(CheckpointError, match="trust_remote_code") as ei:
        load_backend({"backend": "tiny", "source": ck, "device": "cpu"})
    assert "tokenizer_config.json" in str(ei.value)
    clean = tiny_ckpt(tmp_path / "clean", auto_map_in=None)
    assert isinstance(load_backend({"backend": "tiny", "source": clean, "device": "cpu"}).model, TinyDMLLM)


def test_job_refuses_remote_code_before_any_ray_work(tmp_path, no_ray_work):
    ck = tiny_ckpt(tmp_path / "ck")
    write_corpus(str(tmp_path / "in"), 2, 4100, 2, scenes.SceneConfig())
    with pytest.raises(CheckpointError, match="trust_remote_code"):
        _run([f"input={tmp_path / 'in'}", f"output={tmp_path / 'out'}", f"model.source={ck}", *FAST])
    assert no_ray_work == [] and not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------- schemes

@pytest.mark.parametrize("url", ["ftp://x/y", "sftp://host/in/", "hdfs://nn/data/*.parquet", "ssh://h/x.jsonl"])
def test_input_scheme_not_allowed_is_refused_before_any_ray_work(tmp_path, no_ray_work, random_ckpt, url):
    with pytest.raises(SchemeNotAllowedError, match=r"scheme '\w+' is not allowed") as ei:
        _run([f"input={url}", f"output={tmp_path / 'out'}", f"model.source={random_ckpt}", *FAST])
    assert "storage.allowed_schemes" in str(ei.value)
    assert no_ray_work == [] and not (tmp_path / "out").exists()


def test_output_scheme_not_allowed_is_refused(tmp_path, no_ray_work, random_ckpt):
    write_corpus(str(tmp_path / "in"), 2, 4101, 2, scenes.SceneConfig())
    with pytest.raises(SchemeNotAllowedError, match="'ftp' is not allowed"):
        _run([f"input={tmp_path / 'in'}", "output=ftp://x/out", f"model.source={random_ckpt}", *FAST])
    assert no_ray_work == []


@pytest.mark.parametrize("source", ["ftp://x/ckpt", "sftp://host/ckpt", "ssh://h/ckpt"])
def test_model_scheme_not_allowed_is_refused_before_any_ray_work(tmp_path, no_ray_work, source):
    write_corpus(str(tmp_path / "in"), 2, 4102, 2, scenes.SceneConfig())
    scheme = source.split("://")[0]
    with pytest.raises(CheckpointError, match=f"scheme '{scheme}' is not allowed"):
        _run([f"input={tmp_path / 'in'}", f"output={tmp_path / 'out'}", f"model.source={source}", *FAST])
    assert no_ray_work == [] and not (tmp_path / "out").exists()
    with pytest.raises(CheckpointError, match=f"scheme '{scheme}' is not allowed"):  # the worker-side loader too
        load_backend({"backend": "tiny", "source": source, "device": "cpu"})


class _ExtraFS(MemoryFileSystem):
    """A filesystem dcam does not allow by default (protocol "dcamextra")."""
    protocol = "dcamextra"

    @classmethod
    def _strip_protocol(cls, path):
        return super()._strip_protocol(path.removeprefix("dcamextra://"))


def test_allowed_schemes_can_extend_and_restrict_the_list(tmp_path, monkeypatch, random_ckpt):
    """storage.allowed_schemes governs data URLs (input, output, shards) and the model source."""
    import fsspec

    import dcam.pipeline.job as job
    from dcam.pipeline.sources import list_shards

    fsspec.register_implementation("dcamextra", _ExtraFS, clobber=True)
    extended = [*DEFAULT_ALLOWED_SCHEMES, "dcamextra"]
    allow = f"storage.allowed_schemes=[{','.join(extended)}]"
    url, model_url = "dcamextra:///dcam-security-extra/in", "dcamextra:///dcam-security-extra/ckpt"
    mem = MemoryFileSystem()
    try:
        write_corpus(url, 2, 4103, 2, scenes.SceneConfig(), {"allowed_schemes": extended})
        for name in os.listdir(random_ckpt):
            mem.pipe_file(f"/dcam-security-extra/ckpt/{name}", open(os.path.join(random_ckpt, name), "rb").read())
        with pytest.raises(SchemeNotAllowedError, match="'dcamextra' is not allowed"):
            list_shards(url)
        assert len(list_shards(url, "auto", {"allowed_schemes": extended})) == 1

        def reached(*a, **k):
            raise _Reached()

        monkeypatch.setattr(job, "execute", reached)
        base = [f"input={url}", f"output={tmp_path / 'out'}", f"model.source={random_ckpt}", *FAST]
        with pytest.raises(SchemeNotAllowedError, match="'dcamextra' is not allowed"):  # data URL, default list
            _run(base)
        with pytest.raises(_Reached):  # extended: listing, counting and the manifest all work
            _run([*base, allow])
        remote_model = [f"input={tmp_path / 'none'}", f"output={tmp_path / 'out3'}", f"model.source={model_url}", *FAST]
        with pytest.raises(CheckpointError, match="'dcamextra' is not allowed"):  # model URL, default list
            _run(remote_model)
        with pytest.raises(_Reached):  # extended: the model's config.json is checked on the new scheme
            _run([f"input={url}", *remote_model[1:], allow])
        # restricted: a list without "file" refuses local paths: the local model dir, the local output dir
        with pytest.raises(CheckpointError, match="'file' is not allowed"):
            _run([*base, "storage.allowed_schemes=[s3,dcamextra]"])
        with pytest.raises(SchemeNotAllowedError, match="'file' is not allowed"):
            _run([f"input={url}", f"output={tmp_path / 'out2'}", f"model.source={model_url}", *FAST,
                  "storage.allowed_schemes=[s3,dcamextra]"])
        assert not (tmp_path / "out2").exists()
    finally:
        mem.rm("/dcam-security-extra", recursive=True)


# ----------------------------------------------------------------------------------------------- credentials

def _forms(secret: str) -> set[bytes]:
    return {f.encode() for f in (secret, quote(secret, safe=""), quote(secret))}


def _find_secrets(blob: bytes | str, secrets: dict[str, str]) -> list[str]:
    data = blob.encode("utf-8", "surrogatepass") if isinstance(blob, str) else bytes(blob)
    return [name for name, s in secrets.items() if any(f in data for f in _forms(s))]


def _parquet_leaks(data: bytes, secrets: dict[str, str]) -> list[str]:
    """Secrets in a Parquet file's decoded values (every string/binary column), metadata and footer."""
    found = []
    t = pq.read_table(io.BytesIO(data))
    for name in t.column_names:
        col = t[name]
        if pa.types.is_string(col.type) or pa.types.is_large_string(col.type) or \
                pa.types.is_binary(col.type) or pa.types.is_large_binary(col.type):
            for v in col.to_pylist():
                if v is not None:
                    found += [f"{name}:{s}" for s in _find_secrets(v, secrets)]
    md = pq.read_metadata(io.BytesIO(data))
    for k, v in (md.metadata or {}).items():
        found += [f"metadata:{s}" for s in _find_secrets(k + b"=" + v, secrets)]
    found += [f"schema:{s}" for s in _find_secrets(str(t.schema), secrets)]
    return found


def _ray_session_logs() -> list[str]:
    try:
        import ray

        d = ray._private.worker._global_node.get_session_dir_path()
    except Exception:  # noqa: BLE001 - private API; the check is skipped when it moves
        return []
    out = []
    for base, _, files in os.walk(os.path.join(d, "logs")):
        out += [os.path.join(base, f) for f in files]
    return out


def _secret_input_shard(url: str, bucket_url: str, url_secret: str, so: dict) -> dict[str, str]:
    """3 good scenes + rows that fail with error strings (missing S3 object, unreachable URL that
    carries credentials in its user-info, no image); returns {id: expected status}."""
    rows = []
    for i in range(3):
        sc = scenes.make_scene(4200, i)
        rows.append(dict(id=f"good-{i}", image=png_bytes(sc.image), prompt=sc.prompt, response=sc.caption,
                         mask=png_bytes(sc.mask), objects=sc.objects_json()))
    rows += [dict(id="missing-object", image_uri=f"{bucket_url}/in/no-such-image.png", prompt="describe the image"),
             dict(id="userinfo-uri", image_uri=f"http://dcamuser:{url_secret}@127.0.0.1:9/img.png",
                  prompt="describe the image"),
             dict(id="no-image", prompt="describe the image")]
    schema = pa.schema([("id", pa.string()), ("image", pa.binary()), ("image_uri", pa.string()),
                        ("prompt", pa.string()), ("response", pa.string()), ("mask", pa.binary()),
                        ("objects", pa.string())])
    table = pa.Table.from_pylist([{c: r.get(c) for c in schema.names} for r in rows], schema=schema)
    fs, path = storage.open_fs(url, so)
    with fs.open(path, "wb") as f:
        pq.write_table(table, f)
    return {r["id"]: "ok" if r.get("image") else "error" for r in rows}


@pytest.mark.slow
def test_no_credential_in_any_output_or_log(s3_bucket, ray_local, random_ckpt, monkeypatch, capfd):
    """Plant secrets (S3 key and secret of a moto bucket, a session token env var, a password in an
    input URL's user-info) and run a job s3:// -> s3:// with failing rows and the report on; then
    look for every secret in every object written, in every decoded Parquet value, in the returned
    summary, in the log lines, in the driver's captured stdout/stderr and in Ray's session logs."""
    fixture = s3_bucket.storage_options  # endpoint + the fixture's fake (but known) credentials
    planted = {"s3_key": "DCAMKEY" + pysecrets.token_hex(8).upper(),
               "s3_secret": "dcamSECRET-" + pysecrets.token_hex(12) + "/Ab+Cd",
               "env_token": "dcamENVTOKEN-" + pysecrets.token_hex(12),
               "url_password": "dcamURLPASS-" + pysecrets.token_hex(12)}
    known = dict(planted, fixture_key=fixture["key"], fixture_secret=fixture["secret"])
    monkeypatch.setenv("DCAM_TEST_S3_SECRET", planted["s3_secret"])  # the config reads it from the env
    monkeypatch.setenv("AWS_SESSION_TOKEN", planted["env_token"])  # a credential env var of the driver
    so = dict(fixture, key=planted["s3_key"], secret=planted["s3_secret"])  # moto accepts any credentials
    expected = _secret_input_shard(f"{s3_bucket.url}/in/shard.parquet", s3_bucket.url, planted["url_password"], so)
    logs: list[str] = []
    s = _run([f"input={s3_bucket.url}/in/", f"output={s3_bucket.url}/audit", f"model.source={random_ckpt}",
              f"storage.endpoint_url={fixture['endpoint_url']}", f"storage.region={fixture['region']}",
              f"storage.key={planted['s3_key']}", "storage.secret=${oc.env:DCAM_TEST_S3_SECRET}",
              "storage.retry_attempts=2", "storage.retry_base_delay=0.01", *WITH_REPORT], log=logs.append)
    t = _results(f"{s3_bucket.url}/audit", so).to_pandas()
    assert s["inputs"] == len(expected) and s["ok"] == sum(v == "ok" for v in expected.values()), \
        (s["errors"], sorted(set(t[t.status == "error"].error_kind + ": " + t[t.status == "error"].error)))
    errors = t[t.status == "error"].set_index("id")
    assert set(errors.index) == {k for k, v in expected.items() if v == "error"}
    missing, userinfo = errors.loc["missing-object"], errors.loc["userinfo-uri"]
    assert missing.error_kind == "fetch" and "no-such-image.png" in missing.error
    assert userinfo.error_kind == "fetch" and "***@127.0.0.1" in userinfo.error

    leaks: dict[str, list[str]] = {}
    fs, root = storage.open_fs(f"{s3_bucket.url}/audit", so)
    objects = fs.find(root)
    assert any(o.endswith("report.html") for o in objects) and any(o.endswith("summary.json") for o in objects)
    assert any(o.endswith("manifest.json") for o in objects) and any("/results/" in o for o in objects)
    for obj in objects:
        data = fs.cat_file(obj)
        found = _find_secrets(obj, known) + _find_secrets(data, known)
        if obj.endswith(".parquet"):
            found += _parquet_leaks(data, known)
        if found:
            leaks[obj] = found
    for name, blob in (("summary", json.dumps(s, default=str)), ("log", "\n".join(logs))):
        if _find_secrets(blob, known):
            leaks[name] = _find_secrets(blob, known)
    out, err = capfd.readouterr()
    if _find_secrets(out + err, known):
        leaks["driver stdout/stderr"] = _find_secrets(out + err, known)
    for path in _ray_session_logs():  # only the secrets planted here: they are unique to this test
        try:
            with open(path, "rb") as f:
                found = _find_secrets(f.read(), planted)
        except OSError:
            continue
        if found:
            leaks[path] = found
    assert leaks == {}, leaks


@pytest.fixture
def http_dir(tmp_path):
    """A plain HTTP server on 127.0.0.1 serving tmp_path/srv (loopback only); yields (dir, port)."""
    import http.server
    import threading

    root = tmp_path / "srv"
    root.mkdir()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **k):
            super().__init__(*a, directory=str(root), **k)

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield root, srv.server_address[1]
    srv.shutdown()
    srv.server_close()


def test_credentials_in_an_input_url_never_reach_outputs(tmp_path, http_dir, monkeypatch, random_ckpt):
    """An input URL with user-info (https://user:password@host/...) is either refused with a
    StorageError or accepted; either way the password must not reach manifest.json, the run
    directory's file names or the shard keys that name output files (they are derived from URLs)."""
    import dcam.pipeline.job as job

    srv, port = http_dir
    sc = scenes.make_scene(4400, 0)
    (srv / "img.png").write_bytes(png_bytes(sc.image))
    (srv / "m.jsonl").write_text(json.dumps({"id": "a", "image_uri": "img.png", "prompt": "describe the image"}) + "\n")
    password = "dcamURLPASS-" + pysecrets.token_hex(8)
    reached = []

    def stop(pending, run, d, h, log):
        reached.append([e.shard_key for e in pending])
        raise _Reached()

    monkeypatch.setattr(job, "execute", stop)
    out = tmp_path / "out"
    try:
        _run([f"input=http://dcamuser:{password}@127.0.0.1:{port}/m.jsonl", "format=jsonl", f"output={out}",
              f"model.source={random_ckpt}", *FAST])
    except _Reached:
        pass
    except storage.StorageError as e:  # refused: fine, as long as the message does not echo it
        assert password not in str(e)
    leaks = [k for keys in reached for k in keys if password in k]
    for base, _, files in os.walk(out):
        for name in files:
            p = os.path.join(base, name)
            if password in os.path.relpath(p, out) or password.encode() in open(p, "rb").read():
                leaks.append(os.path.relpath(p, out))
    assert leaks == [], leaks


def test_storage_objects_and_errors_never_show_credentials(monkeypatch):
    """str/repr of storage-related objects, and describe_error on an S3 authentication failure."""
    import botocore.exceptions
    import s3fs.errors

    from dcam.pipeline.decode import DecodeStage
    from dcam.pipeline.manifest import RunDir
    from dcam.pipeline.sinks import WriteStage
    from dcam.pipeline.sources import shard_spec
    from dcam.pipeline.sources.base import ShardContext

    key, secret, token = "DCAMKEY" + pysecrets.token_hex(6).upper(), "dcamSECRET-" + pysecrets.token_hex(8) + "/+=", \
        "dcamTOKEN-" + pysecrets.token_hex(8)
    env_secret = "dcamENVSECRET-" + pysecrets.token_hex(8)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", env_secret)
    so = {"key": key, "secret": secret, "token": token, "endpoint_url": "http://127.0.0.1:9",
          "client_kwargs": {"aws_secret_access_key": secret}, "allowed_schemes": ["memory", "file", "s3"]}
    known = {"key": key, "secret": secret, "token": token, "env": env_secret}
    MemoryFileSystem().pipe_file("/dcam-security-repr/x.jsonl", b"{}\n")
    try:
        objs = {"RunDir": RunDir("memory:///dcam-security-repr/run", so),
                "WriteStage": WriteStage("memory:///dcam-security-repr/run", "h", {}, so),
                "DecodeStage": DecodeStage({"storage": so}),
                "ShardContext": ShardContext.make(shard_spec("memory:///dcam-security-repr/x.jsonl", "jsonl"), so, {}),
                "safe_options": storage.safe_options(so)}
        shown = {name: f"{o!s}\n{o!r}" for name, o in objs.items()}
    finally:
        MemoryFileSystem().rm("/dcam-security-repr", recursive=True)
    # an S3 authentication failure as s3fs raises it (botocore ClientError -> PermissionError), with
    # the credentials echoed back the way a misbehaving proxy or endpoint might
    body = {"Error": {"Code": "SignatureDoesNotMatch", "Message": f"The request signature we calculated does not "
                      f"match. AWSAccessKeyId={key} secret={secret} token={token} env={env_secret} "
                      f"url=s3://{key}:{quote(secret, safe='')}@bucket/x"},
            "ResponseMetadata": {"HTTPStatusCode": 403}}
    client_err = botocore.exceptions.ClientError(body, "GetObject")
    translated = s3fs.errors.translate_boto_error(client_err)
    shown["describe_error(ClientError)"] = storage.describe_error(client_err, storage.secrets_of(so))
    shown["describe_error(s3fs)"] = storage.describe_error(translated, storage.secrets_of(so))
    try:
        storage.with_retries(lambda: (_ for _ in ()).throw(ConnectionError(f"reset {secret} {key}")), attempts=2,
                             base_delay=0.0, secrets=storage.secrets_of(so))
    except storage.RetriesExhaustedError as e:
        shown["RetriesExhaustedError"] = f"{e!s}\n{e!r}"
    with pytest.raises(SchemeNotAllowedError) as ei:
        storage.open_fs(f"ftp://user:{secret}@host/x", so)
    shown["SchemeNotAllowedError"] = str(ei.value)
    assert not storage.is_transient(translated)  # an auth failure is never retried
    leaks = {name: _find_secrets(text, known) for name, text in shown.items() if _find_secrets(text, known)}
    assert leaks == {}, leaks  # names only: a failing run must not print the secrets either
    assert "SignatureDoesNotMatch" in shown["describe_error(ClientError)"] or "signature" in \
        shown["describe_error(ClientError)"].lower()


# ----------------------------------------------------------------------------------------------- paths

HOSTILE_IDS = ["../../etc/passwd", "/abs/path", "a/b\\c", "..", "~root/.ssh/id_rsa", "con:nul*?<>|\"'",
               "%2e%2e%2fup", "ünï cödé\tid\n", "a" * 300, ""]


@pytest.mark.slow
def test_hostile_ids_and_shard_names_never_steer_output_paths(ray_local, tmp_path, random_ckpt):
    assert not os.path.exists("/abs/path") and not os.path.exists("/abs")
    shard_name = "odd shard #1 (ü) & ;$x'%41[1]~.parquet"
    rows = []
    for i, rid in enumerate(HOSTILE_IDS):
        sc = scenes.make_scene(4300, i)
        rows.append(dict(id=rid, image=png_bytes(sc.image), prompt=sc.prompt, response=sc.caption,
                         mask=png_bytes(sc.mask), objects=sc.objects_json()))
    (tmp_path / "in").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "in" / shard_name)
    out = tmp_path / "run" / "out"
    s = _run([f"input={tmp_path / 'in'}", f"output={out}", f"model.source={random_ckpt}", *WITH_REPORT])
    assert s["inputs"] == len(HOSTILE_IDS) and s["ok"] == len(HOSTILE_IDS), s
    # nothing was written outside the run directory (the input dir is untouched)
    assert sorted(os.listdir(tmp_path)) == ["in", "run"] and os.listdir(tmp_path / "run") == ["out"]
    assert os.listdir(tmp_path / "in") == [shard_name]
    assert not os.path.exists("/abs/path")
    written = []
    for base, dirs, files in os.walk(out):
        for name in dirs + files:
            p = os.path.join(base, name)
            assert not os.path.islink(p), p
            rel = os.path.relpath(os.path.realpath(p), os.path.realpath(out))
            assert not rel.startswith("..") and not os.path.isabs(rel), p
            assert all(SAFE_NAME.fullmatch(part) for part in rel.split(os.sep)), rel
            written.append(rel)
    assert {"manifest.json", "summary.json", "_SUCCESS", os.path.join("report", "report.html")} <= set(written)
    finals = [w for w in written if w.startswith("results" + os.sep) and w.endswith(".parquet")]
    assert len(finals) == 1
    # the ids themselves are data: kept exactly as given (an empty id gets the generated one)
    t = _results(str(out)).to_pandas()
    ids = set(t.id)
    assert set(HOSTILE_IDS[:-1]) <= ids and len(ids) == len(HOSTILE_IDS)


def test_redact_scrubs_presigned_url_query_credentials_but_keeps_the_rest():
    # Regression: an image_uri that is a pre-signed URL leaked its signature into `error` strings.
    sig, cred, sas = "f00dfeed" * 8, "AKIAEXAMPLE%2F20261127%2Fus-east-1", "sv2026sigvalue"
    url = (f"https://bucket.s3.amazonaws.com/img/1.jpg?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential={cred}"
           f"&X-Amz-Signature={sig}&X-Amz-Expires=300")
    azure = f"https://acct.blob.core.windows.net/c/2.png?sv=2024-01-01&sig={sas}&se=2026"
    out = storage.redact(f"HTTPError 403 for {url}; then {azure}", secrets=[])
    assert sig not in out and "AKIAEXAMPLE" not in out and sas not in out, out
    assert "X-Amz-Expires=300" in out and "X-Amz-Algorithm=AWS4-HMAC-SHA256" in out and "sv=2024-01-01" in out
    assert "bucket.s3.amazonaws.com/img/1.jpg" in out
