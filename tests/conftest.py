"""Shared pytest fixtures (kept minimal).

s3_server   session: an in-process moto S3 server on 127.0.0.1 (free port) with fake credentials. While it
            runs, AWS_ENDPOINT_URL / AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_REGION point at it so
            pyarrow, s3fs and Ray workers started afterwards find it; real AWS config files are hidden.
            Yields dict(endpoint_url, key, secret, region).
s3_bucket   function: a fresh bucket on that server. Returns a namespace with .name, .url ("s3://name")
            and .storage_options (dcam's `storage` section: endpoint, fake creds, fast retries).
ray_local   session: one local Ray cluster for the whole session (num_cpus=2, one logical GPU so the
            production stage topology is exercised, 512 MiB object store, no dashboard, quiet).
            Request s3_server before ray_local if Ray workers must inherit the S3 env vars.

Only loopback addresses are ever used; nothing here touches the network.
"""
from __future__ import annotations

import itertools
import logging
import os
import types

import pytest

# One intra-op thread in the test process: Ray workers run beside it on 2 cores, and OpenMP
# spin-waiting under oversubscription slows everything down by an order of magnitude.
os.environ.setdefault("OMP_NUM_THREADS", "1")
try:
    import torch

    torch.set_num_threads(1)
except ImportError:  # pragma: no cover
    pass

FAKE_KEY = "dcam-test-access-key"
FAKE_SECRET = "dcam-test-secret-not-real"
REGION = "us-east-1"
_bucket_counter = itertools.count()


@pytest.fixture(scope="session")
def s3_server():
    """moto ThreadedMotoServer on 127.0.0.1:<free port>, with the AWS env vars pointing at it."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no per-request access log
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    assert host == "127.0.0.1", host  # loopback only, ever
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": FAKE_KEY, "AWS_SECRET_ACCESS_KEY": FAKE_SECRET,
           "AWS_REGION": REGION, "AWS_DEFAULT_REGION": REGION, "AWS_EC2_METADATA_DISABLED": "true",
           "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
           "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
            mp.delenv(k, raising=False)
        yield {"endpoint_url": endpoint, "key": FAKE_KEY, "secret": FAKE_SECRET, "region": REGION}
    server.stop()


@pytest.fixture
def s3_bucket(s3_server):
    """A new, empty bucket; .storage_options is what dcam code takes as `storage_options`."""
    import s3fs

    name = f"dcam-test-{os.getpid()}-{next(_bucket_counter)}"
    fs = s3fs.S3FileSystem(key=FAKE_KEY, secret=FAKE_SECRET, endpoint_url=s3_server["endpoint_url"])
    fs.call_s3("create_bucket", Bucket=name)  # s3fs.mkdir would send a us-east-1 LocationConstraint
    fs.invalidate_cache()
    opts = dict(s3_server, retry_attempts=3, retry_base_delay=0.01)
    return types.SimpleNamespace(name=name, url=f"s3://{name}", storage_options=opts)


@pytest.fixture(scope="session")
def ray_local(tmp_path_factory):
    """One local Ray cluster per session (tests must not call ray.init themselves)."""
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    os.environ["RAY_DATA_DISABLE_PROGRESS_BARS"] = "1"
    os.environ.setdefault("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", "2")
    import shutil
    import tempfile

    import ray

    temp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    ray.init(num_cpus=2, num_gpus=1, object_store_memory=512 * 1024 * 1024, include_dashboard=False,
             logging_level="ERROR", _temp_dir=temp)
    yield ray
    ray.shutdown()
    shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="session")
def random_ckpt(tmp_path_factory):
    """An untrained tiny checkpoint: pipeline wiring tests do not depend on map quality."""
    import torch

    from dcam.actors.models.tiny_dmllm import TinyDMLLM, TinyDMLLMConfig, WordTokenizer

    d = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    cfg = TinyDMLLMConfig()
    TinyDMLLM(cfg).save_pretrained(d)
    WordTokenizer(cfg.vocab).save_pretrained(str(d))
    return str(d)
