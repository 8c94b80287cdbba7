"""Issue 18 item 6: every documented way to read a run's results (the `<!-- snippet: ... -->`
blocks of README.md and k8s/README.md: pandas, pyarrow, duckdb; local and S3) runs in a fresh
interpreter that never imports Ray, against a real run directory, and reads exactly its results,
even with part files and a half-written file present in _staging/ as while a run is going."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.compute as pc
import pytest
from jobutil import FAST, _results, _run

from dcam.actors import scenes
from dcam.pipeline.synth import write_corpus

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
DOCS = ("README.md", "k8s/README.md")
SNIPPET = re.compile(r"<!-- snippet: (local|s3) -->\s*```python\n(.*?)```", re.S)
LOCAL_RUN = "dcam-runs/default"  # what the snippets name; replaced by the test's run
S3_RUNS = ("s3://bucket/audits/run-1", "s3://dcam-audits/audits/audit-20260115-0200")
REPORT = """
import json, sys
g = dict(globals())
out = {"ray": "ray" in sys.modules}
for name, size in (("df", len), ("means", len), ("t", lambda t: t.num_rows), ("m", lambda m: list(m.shape)),
                   ("rows", lambda rows: sum(int(r[1]) for r in rows))):
    if name in g:
        out[name] = size(g[name])
print(json.dumps(out))
"""


def _snippets():
    found = [(doc, where, code) for doc in DOCS for where, code in SNIPPET.findall((ROOT / doc).read_text())]
    return [pytest.param(doc, where, code, id=f"{doc}:{where}:{k}") for k, (doc, where, code) in enumerate(found)]


def test_reading_sections_show_only_tested_snippets():
    """Every Python block of README's "Reading results" section is a tested snippet; the k8s
    README's pandas snippet reads results/ (it used to read the run directory and fail on manifest.json)."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("### Reading results"):text.index("## Input formats")]
    assert section.count("```python") == len(SNIPPET.findall(section)) >= 6
    kinds = {(where, lib) for where, code in SNIPPET.findall(section) for lib in ("pandas", "pyarrow", "duckdb")
             if lib in code}
    assert kinds == {(w, lib) for w in ("local", "s3") for lib in ("pandas", "pyarrow", "duckdb")}
    assert [w for w, _ in SNIPPET.findall((ROOT / "k8s/README.md").read_text())] == ["s3"]


@pytest.fixture(scope="module")
def audited(s3_server, ray_local, tmp_path_factory, random_ckpt):
    """A finished local run, a part file and a half-written file in its _staging/ (as while a run
    goes on), the same directory copied to the loopback S3; plus what it holds."""
    import s3fs

    root = tmp_path_factory.mktemp("reading")
    write_corpus(str(root / "in"), 8, 1195, 4, scenes.SceneConfig())
    run = root / "run"
    _run([f"input={root / 'in'}", f"output={run}", f"model.source={random_ckpt}", *FAST])
    (run / "_staging" / "parts").mkdir(parents=True, exist_ok=True)
    (run / "_staging" / "tmp").mkdir(parents=True, exist_ok=True)
    first = sorted((run / "results").glob("*.parquet"))[0]
    shutil.copy(first, run / "_staging" / "parts" / (first.stem + ".000000000-000000003.parquet"))
    (run / "_staging" / "tmp" / (first.name + ".ab12cd34.tmp")).write_bytes(first.read_bytes()[:100])
    fs = s3fs.S3FileSystem(key=s3_server["key"], secret=s3_server["secret"], endpoint_url=s3_server["endpoint_url"])
    bucket = "dcam-reading"
    fs.call_s3("create_bucket", Bucket=bucket)
    fs.put(str(run), f"{bucket}/audits/run-1", recursive=True)
    t = _results(str(run))
    expected = dict(rows=t.num_rows, ok_rows=int(pc.sum(pc.equal(t["status"], "ok")).as_py()),
                    methods=len(set(t["method"].to_pylist()) - {None}))
    assert expected["rows"] > 8 and expected["ok_rows"] > 0
    return str(run), f"s3://{bucket}/audits/run-1", expected


@pytest.mark.parametrize("doc,where,code", _snippets())
def test_documented_snippet_reads_exactly_the_results(audited, doc, where, code):
    local, s3, expected = audited
    code = code.replace(LOCAL_RUN, local)
    for placeholder in S3_RUNS:
        code = code.replace(placeholder, s3)
    assert (local if where == "local" else s3) in code, f"{doc}: the snippet names no known run path"
    proc = subprocess.run([sys.executable, "-c", code + REPORT], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{doc} snippet failed:\n{code}\n{proc.stderr[-3000:]}"
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out.pop("ray") is False
    assert out, f"{doc}: the snippet leaves none of df, t, m, rows, means"
    for name, value in out.items():
        want = {"df": expected["rows"], "t": expected["rows"], "means": expected["methods"],
                "rows": expected["ok_rows"] if "status = 'ok'" in code else expected["rows"]}.get(name)
        if name == "m":
            from dcam.actors.models.tiny_dmllm import TinyDMLLMConfig

            want = [TinyDMLLMConfig().grid] * 2
        assert value == want, (doc, name, value, want)
