"""What the CLI prints for an error an operator can act on: one line and an exit code instead of a
traceback (`--debug` shows the traceback). Anything not listed here is a bug and keeps its traceback.

Exit codes (README "Exit codes"): 2 = a verdict that retrying cannot change (invalid config or
arguments, missing input, unknown format, no such model, output holding another run, bad
credentials); 1 = the job failed in a way a retry may fix (storage unreachable after retries,
shards left incomplete, the model failed to load on a worker).
"""
from __future__ import annotations

import re

USER_ERROR, FAILURE = 2, 1

# (module, class name) -> exit code. Matched by name along the exception's MRO, so the CLI imports
# none of these modules (torch, Ray) to classify an error.
KNOWN: dict[tuple[str, str], int] = {
    ("dcam.pipeline.config_check", "ConfigError"): USER_ERROR,
    ("dcam.pipeline.sources.listing", "SourceUnavailableError"): FAILURE,
    ("dcam.pipeline.sources.base", "SourceError"): USER_ERROR,
    ("dcam.pipeline.manifest", "RunConflictError"): USER_ERROR,
    ("dcam.pipeline.report.build", "NoRunError"): USER_ERROR,
    ("dcam.actors.models.loading", "CheckpointError"): USER_ERROR,
    ("dcam.pipeline.job", "ClusterResourceError"): USER_ERROR,
    ("dcam.pipeline.storage", "RetriesExhaustedError"): FAILURE,
    ("dcam.pipeline.storage", "StorageError"): USER_ERROR,
    ("dcam.pipeline.job", "JobIncompleteError"): FAILURE,
    ("dcam.actors.probe_actor", "ModelLoadError"): FAILURE,
    ("builtins", "FileNotFoundError"): USER_ERROR,
    ("builtins", "PermissionError"): USER_ERROR,
    ("builtins", "NotADirectoryError"): USER_ERROR,
    ("builtins", "ConnectionError"): FAILURE,
    ("builtins", "TimeoutError"): FAILURE,
}


def _code_of(exc: BaseException) -> int | None:
    for cls in type(exc).__mro__:
        code = KNOWN.get((cls.__module__, cls.__name__))
        if code is not None:
            return code
    if type(exc).__module__.startswith("botocore"):  # credentials, endpoint, access denied
        from dcam.pipeline.storage import is_transient

        return FAILURE if is_transient(exc) else USER_ERROR
    return None


def _chain(exc: BaseException, limit: int = 8) -> list[BaseException]:
    """The exception, then what Ray wrapped inside it (RayTaskError.cause, UserCodeException's
    __cause__): a worker's ModelLoadError reaches the driver two wrappers deep."""
    out, seen = [], set()
    while exc is not None and id(exc) not in seen and len(out) < limit:
        seen.add(id(exc))
        out.append(exc)
        cause = getattr(exc, "cause", None) if type(exc).__module__.startswith("ray") else None
        exc = cause if isinstance(cause, BaseException) else exc.__cause__
    return out


# `dcam.actors.probe_actor.ModelLoadError: ProbeActor could not load ...` inside a Ray error's text
_REMOTE = re.compile(r"^(dcam(?:\.\w+)+)\.(\w+): (.+)$", re.M)


def _from_ray_text(exc: BaseException) -> tuple[int, str] | None:
    """A dcam error raised in a worker: Ray Data re-raises it on the driver as a UserCodeException
    that keeps only the remote traceback's text, so the error's class is read from that text."""
    if not type(exc).__module__.startswith("ray"):
        return None
    for module, name, message in _REMOTE.findall(str(exc)):
        code = KNOWN.get((module, name))
        if code is not None:
            return code, message.strip()
    return None


def operator_message(exc: BaseException) -> tuple[int, str] | None:
    """(exit code, one-line message) for an error an operator can act on, else None."""
    found = [(e, _code_of(e)) for e in _chain(exc)]
    exc, code = next(((e, c) for e, c in found if c is not None), (exc, None))
    if code is None:
        remote = _from_ray_text(found[0][0])
        if remote is None:
            return None
        from dcam.pipeline.storage import redact, secrets_of

        return remote[0], redact(remote[1], secrets_of(None))
    from dcam.pipeline.storage import redact, secrets_of

    text = " ".join(str(exc).split()) or type(exc).__name__
    builtin = type(exc).__module__ in ("builtins",) or type(exc).__module__.startswith("botocore")
    if builtin:
        text = f"{type(exc).__name__}: {text}"
    return code, redact(text, secrets_of(None))
