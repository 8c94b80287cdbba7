"""The resolved config of a run, stored in its directory as config.json (credentials redacted):

    {"dcam_version", "config_hash", "hashed": the result-relevant keys, "config": every key}

A rerun on the same output compares its result-relevant keys with the stored ones before any
work: equal -> resume (throughput keys such as probe.batch_size may differ: a job that ran out of
GPU memory resumes at a smaller batch); different -> refused, listing every key that differs with
the run's value and this command's. The report shows the stored config (audit trail).
"""
from __future__ import annotations

import json
import time

from dcam.pipeline.config import differing_keys, hashed_view
from dcam.pipeline.manifest import RunConflictError, RunDir
from dcam.pipeline.storage import redact, safe_options, secrets_of

CONFIG = "config.json"
SHOWN_DIFFERENCES = 12


def redacted(d: dict) -> dict:
    """The config without credentials (storage sections masked, secrets cut out of URLs)."""
    so = d.get("storage") or {}
    secrets = secrets_of(so) + secrets_of((d.get("model") or {}).get("storage_options"))
    text = redact(json.dumps(d, default=str), secrets)
    out = json.loads(text)
    if "storage" in out:
        out["storage"] = safe_options(out["storage"])
    if isinstance(out.get("model"), dict) and out["model"].get("storage_options"):
        out["model"]["storage_options"] = safe_options(out["model"]["storage_options"])
    return out


def check_run_config(run: RunDir, d: dict, cfg_hash: str) -> None:
    """Refuse (RunConflictError, one line listing the differing keys) when the run directory holds a
    run whose result-relevant config differs from this one."""
    if not run.exists(CONFIG):
        return  # a new run, or one made before config.json existed: the manifest's hash decides
    old = json.loads(run.read_text(CONFIG))
    if old.get("config_hash") == cfg_hash:
        return
    diffs = differing_keys(old.get("hashed") or {}, hashed_view(d))
    shown = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in diffs[:SHOWN_DIFFERENCES])
    more = f"; and {len(diffs) - SHOWN_DIFFERENCES} more" if len(diffs) > SHOWN_DIFFERENCES else ""
    raise RunConflictError(
        f"{redact(run.url, secrets_of(run.storage_options))} holds a run made with another configuration "
        f"(config {old.get('config_hash')} vs {cfg_hash}); result-relevant keys that differ (run -> this command): "
        f"{shown or 'none recorded'}{more}. Use another output, or the run's values (throughput keys such as "
        "probe.batch_size, probe.rows_per_pass, actors.*, ray.* may change freely)")


def store_run_config(run: RunDir, d: dict, cfg_hash: str) -> None:
    """Write config.json (the latest execution's config; its result-relevant part never changes)."""
    from dcam import __version__

    written = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    doc = dict(dcam_version=__version__, config_hash=cfg_hash, written=written, hashed=redacted(hashed_view(d)),
               config=redacted(d))
    run.write_text(CONFIG, json.dumps(doc, indent=1, default=str))


def read_run_config(run: RunDir) -> dict | None:
    """The stored config.json of a run (None when absent or unreadable)."""
    if not run.exists(CONFIG):
        return None
    try:
        return json.loads(run.read_text(CONFIG))
    except ValueError:
        return None
