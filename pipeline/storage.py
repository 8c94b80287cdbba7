"""Filesystem helpers for every place dcam reads or writes data: fsspec filesystems from dcam's
`storage` config, a scheme allowlist, bounded retries for transient errors, and credential redaction.

`storage_options` everywhere in dcam is the `storage` config section (a plain dict):

    endpoint_url   S3-compatible endpoint (MinIO, Ceph RGW, ...); else AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL
    key, secret    S3 credentials; else botocore's normal chain (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY,
                   ~/.aws, IRSA/instance roles). Prefer env vars or roles: options travel with Ray tasks.
    token          S3 session token (optional)
    region         S3 region; else AWS_REGION / AWS_DEFAULT_REGION
    anonymous      (or anon) unsigned S3 requests for public buckets
    allowed_schemes  URL schemes dcam may touch (default DEFAULT_ALLOWED_SCHEMES); "file" = plain paths
    retry_attempts, retry_base_delay   used by callers of `with_retries`
    any other key  passed unchanged to the fsspec filesystem (client_kwargs, config_kwargs, gcs token, ...)

Nothing here ever puts a credential value in an exception message: errors go through `redact`.
"""
from __future__ import annotations

import errno
import os
import random
import re
import time
from typing import Any, Callable, Iterable, TypeVar

import fsspec

T = TypeVar("T")

DEFAULT_ALLOWED_SCHEMES = ("file", "s3", "gs", "gcs", "abfs", "az", "http", "https", "memory")
DEFAULT_RETRY_ATTEMPTS = 4
DEFAULT_RETRY_BASE_DELAY = 0.2
# dcam's own keys in the storage section; everything else goes to fsspec untouched.
_DCAM_KEYS = {"endpoint_url", "key", "secret", "token", "region", "anonymous", "anon", "allowed_schemes",
              "retry_attempts", "retry_base_delay"}
_SECRET_KEY_RE = re.compile(r"(secret|token|password|passwd|key|credential|sas|signature|auth)", re.I)
_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID", "AZURE_STORAGE_KEY",
               "AZURE_STORAGE_SAS_TOKEN", "AZURE_STORAGE_CONNECTION_STRING", "AZURE_CLIENT_SECRET")
_URL_USERINFO_RE = re.compile(r"(?P<scheme>[a-zA-Z][\w+.-]*://)[^/@\s]+@")
# Credentials carried in a URL's query string: S3 pre-signed URLs (X-Amz-*), Azure SAS (sig), GCS
# signed URLs (X-Goog-Signature), and the usual token/key parameters of image_uri manifests.
_URL_QUERY_SECRET_RE = re.compile(
    r"(?P<key>[?&;](?:X-Amz-(?:Signature|Credential|Security-Token)|X-Goog-(?:Signature|Credential)|Signature|sig|"
    r"AWSAccessKeyId|access_token|token|api_key|apikey|key|secret|password)=)[^&#\s\"'<>]+", re.IGNORECASE)
TRANSIENT_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequests",
                   "RequestTimeout", "RequestTimeoutException", "InternalError", "ServiceUnavailable",
                   "PriorRequestNotComplete", "BandwidthLimitExceeded", "RequestThrottled"}
_TRANSIENT_CLASS_NAMES = {"EndpointConnectionError", "ConnectionClosedError", "ReadTimeoutError",
                          "ConnectTimeoutError", "ResponseStreamingError", "IncompleteReadError",
                          "ClientConnectionError", "ServerDisconnectedError", "ClientPayloadError",
                          "ServerTimeoutError", "ClientOSError", "ProtocolError", "IncompleteRead"}
_TRANSIENT_ERRNOS = {errno.ECONNRESET, errno.ECONNREFUSED, errno.ECONNABORTED, errno.ETIMEDOUT, errno.EPIPE,
                     errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ENETDOWN, errno.EAGAIN}
_TRANSIENT_TEXT = ("slowdown", "slow down", "throttl", "too many requests", "service unavailable",
                   "internal server error", "bad gateway", "gateway timeout", "connection reset",
                   "connection aborted", "timed out", "temporarily unavailable", "503", "502", "504")


class StorageError(RuntimeError):
    """A storage problem dcam reports with a clean (redacted) message."""


class SchemeNotAllowedError(StorageError, ValueError):
    """The URL's scheme is not in `storage.allowed_schemes`."""


class RetriesExhaustedError(StorageError):
    """A transient error persisted through every attempt of `with_retries`."""

    def __init__(self, message: str, attempts: int):
        super().__init__(message)
        self.attempts = attempts


def scheme_of(url: str) -> str:
    """'s3://b/k' -> 's3'; a plain path (or file://) -> 'file'. Windows drive letters count as paths."""
    if "://" not in url:
        return "file"
    scheme = url.split("://", 1)[0].lower()
    return "file" if scheme in ("file", "local") else scheme


_URL_CREDENTIALS_RE = re.compile(r"^(?P<scheme>[a-zA-Z][\w+.-]*)://(?P<userinfo>[^/@\s]+)@")


class CredentialsInURLError(StorageError, ValueError):
    """The URL carries user:password@ credentials (they would end up in manifests and file names)."""


def check_scheme(url: str, storage_options: dict | None = None) -> str:
    """Return the URL's scheme, or raise SchemeNotAllowedError if the allowlist does not contain it
    (CredentialsInURLError if the URL embeds user:password@)."""
    allowed = (storage_options or {}).get("allowed_schemes") or DEFAULT_ALLOWED_SCHEMES
    scheme = scheme_of(url)
    if scheme not in [s.lower() for s in allowed]:
        raise SchemeNotAllowedError(
            f"URL scheme {scheme!r} is not allowed (storage.allowed_schemes = {sorted(allowed)}): "
            f"{redact(url, secrets_of(storage_options))}")
    m = _URL_CREDENTIALS_RE.match(url)  # abfs://container@account has no ':' and is allowed
    if m and (":" in m["userinfo"] or scheme in ("http", "https")):
        raise CredentialsInURLError("credentials in URLs (user:password@host) are not supported: put them in the "
                                    f"storage section or the environment: {redact(url, secrets_of(storage_options))}")
    return scheme


def fsspec_kwargs(scheme: str, storage_options: dict | None) -> dict:
    """Translate dcam's storage section into keyword arguments for the fsspec filesystem of `scheme`."""
    opts = dict(storage_options or {})
    extra = {k: v for k, v in opts.items() if k not in _DCAM_KEYS}
    if scheme in ("file", "memory"):
        return {}
    if scheme not in ("s3", "s3a"):
        return extra
    kw: dict[str, Any] = dict(extra)
    client_kwargs = dict(kw.pop("client_kwargs", None) or {})
    endpoint = opts.get("endpoint_url") or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    region = opts.get("region") or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if endpoint:
        kw["endpoint_url"] = endpoint
    if region:
        client_kwargs.setdefault("region_name", region)
    if client_kwargs:
        kw["client_kwargs"] = client_kwargs
    if opts.get("anonymous") or opts.get("anon"):
        kw["anon"] = True
    elif opts.get("key") or opts.get("secret"):
        kw["key"], kw["secret"] = opts.get("key"), opts.get("secret")
        if opts.get("token"):
            kw["token"] = opts["token"]
    return kw


def open_fs(url: str, storage_options: dict | None = None):
    """(fsspec filesystem, path inside it) for `url`, after the scheme allowlist check.

    fsspec caches filesystem instances by their arguments, so calling this per row is cheap and does
    not reconnect. Errors are re-raised as StorageError with credentials redacted.
    """
    scheme = check_scheme(url, storage_options)
    try:
        if scheme == "file":
            path = url.split("://", 1)[1] if "://" in url else url
            return fsspec.filesystem("file"), os.path.abspath(os.path.expanduser(path))
        return fsspec.core.url_to_fs(url, **fsspec_kwargs(scheme, storage_options))
    except (ImportError, ValueError, TypeError) as e:
        raise StorageError(f"cannot open a filesystem for {scheme}:// URLs: "
                           f"{describe_error(e, secrets_of(storage_options))}") from None


def join_url(base_url: str, relative: str) -> str:
    """Join a relative path onto a directory URL, keeping the scheme ('s3://b/d' + 'x/y.png')."""
    if "://" in relative or relative.startswith("/"):
        return relative
    if "://" in base_url:
        scheme, rest = base_url.split("://", 1)
        return f"{scheme}://{rest.rstrip('/')}/{relative}"
    return os.path.join(base_url, relative)


def secrets_of(storage_options: dict | None) -> list[str]:
    """Every credential-like value in the options (recursively) plus credential env vars."""
    found: list[str] = []

    def walk(obj: Any, key: str = "") -> None:
        if isinstance(obj, dict):
            for k, v in obj.items():
                walk(v, str(k))
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                walk(v, key)
        elif isinstance(obj, str) and key and _SECRET_KEY_RE.search(key) and key != "allowed_schemes":
            found.append(obj)

    walk(storage_options or {})
    found += [os.environ[k] for k in _SECRET_ENV if os.environ.get(k)]
    return sorted({s for s in found if len(s) >= 4}, key=len, reverse=True)


def redact(text: str, secrets: Iterable[str]) -> str:
    """`text` with every secret (raw or URL-encoded), any URL user-info and any credential-like URL
    query parameter (pre-signed URLs, SAS tokens) replaced by '***'."""
    from urllib.parse import quote

    out = str(text)
    for s in sorted({s for s in secrets if s and len(s) >= 4}, key=len, reverse=True):
        for form in {s, quote(s, safe=""), quote(s)}:
            out = out.replace(form, "***")
    out = _URL_QUERY_SECRET_RE.sub(r"\g<key>***", out)
    return _URL_USERINFO_RE.sub(r"\g<scheme>***@", out)


def safe_options(storage_options: dict | None) -> dict:
    """A copy of the options fit for logs and reprs: credential-like values become '***'."""
    def clean(obj: Any, key: str = "") -> Any:
        if isinstance(obj, dict):
            return {k: clean(v, str(k)) for k, v in obj.items()}
        if isinstance(obj, str) and key and _SECRET_KEY_RE.search(key) and key != "allowed_schemes":
            return "***"
        return obj

    return clean(dict(storage_options or {}))


def describe_error(exc: BaseException, secrets: Iterable[str] = ()) -> str:
    """'TypeName: message' with secrets redacted (the form dcam puts in `error` columns)."""
    msg = str(exc) or repr(exc)
    return redact(f"{type(exc).__name__}: {msg}", secrets)


def _http_status(exc: BaseException) -> int | None:
    for attr in ("status", "status_code", "code"):
        v = getattr(exc, attr, None)
        if isinstance(v, int) and 100 <= v <= 599:
            return v
    resp = getattr(exc, "response", None)
    if isinstance(resp, dict):
        v = resp.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if isinstance(v, int):
            return v
    return None


def _error_code(exc: BaseException) -> str | None:
    resp = getattr(exc, "response", None)
    if isinstance(resp, dict):
        return resp.get("Error", {}).get("Code")
    return None


def _chain(exc: BaseException) -> list[BaseException]:
    out, seen = [], set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        out.append(exc)
        exc = exc.__cause__ or exc.__context__
    return out


def _classify(e: BaseException) -> bool | None:
    """True/False when this exception alone decides transience; None when its cause must decide."""
    if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError,
                      FileExistsError, StorageError, ValueError, TypeError, KeyError)):
        return False
    status, code = _http_status(e), _error_code(e)
    if code in TRANSIENT_CODES:  # AWS sends some throttling errors with HTTP 400
        return True
    if status is not None:
        return status >= 500 or status in (408, 429)
    if isinstance(e, (ConnectionError, TimeoutError)):
        return True
    if any(c.__name__ in _TRANSIENT_CLASS_NAMES for c in type(e).__mro__):
        return True
    if isinstance(e, OSError) and e.errno in _TRANSIENT_ERRNOS:
        return True
    return None


def is_transient(exc: BaseException) -> bool:
    """True for errors worth retrying: connection failures, timeouts, HTTP 5xx/408/429, throttling codes.

    Never transient: not found (404), access denied (403), other 4xx, permission errors, scheme
    refusals, bad arguments. The outermost exception in the cause chain that decides wins (s3fs wraps
    botocore's ClientError in a generic OSError); undecided OSErrors fall back to message hints.
    """
    chain = _chain(exc)
    for e in chain:
        decided = _classify(e)
        if decided is not None:
            return decided
    text = " ".join(str(e).lower() for e in chain if isinstance(e, OSError))
    return any(t in text for t in _TRANSIENT_TEXT)


def with_retries(fn: Callable[[], T], attempts: int = DEFAULT_RETRY_ATTEMPTS,
                 base_delay: float = DEFAULT_RETRY_BASE_DELAY, max_delay: float = 10.0,
                 secrets: Iterable[str] = (), classify: Callable[[BaseException], bool] = is_transient,
                 sleep: Callable[[float], None] = time.sleep) -> T:
    """Call `fn()`; retry transient errors up to `attempts` calls in total, sleeping
    base_delay * 2**k (capped at max_delay, jittered to 50-100% so many workers do not retry in step).

    A non-transient error is raised at once, unchanged. If every attempt fails transiently,
    RetriesExhaustedError (message redacted with `secrets`) is raised from the last error.
    """
    attempts = max(1, int(attempts))
    for k in range(attempts):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - classified below
            if not classify(e):
                raise
            if k == attempts - 1:
                raise RetriesExhaustedError(
                    f"gave up after {attempts} attempts: {describe_error(e, secrets)}", attempts) from e
            sleep(min(max_delay, base_delay * (2 ** k)) * (0.5 + 0.5 * random.random()))
    raise AssertionError("unreachable")


def retry_settings(storage_options: dict | None) -> tuple[int, float]:
    """(attempts, base_delay) from the storage section, with dcam's defaults."""
    opts = storage_options or {}
    return (int(opts.get("retry_attempts", DEFAULT_RETRY_ATTEMPTS)),
            float(opts.get("retry_base_delay", DEFAULT_RETRY_BASE_DELAY)))


def read_bytes(url: str, storage_options: dict | None = None, max_bytes: int | None = None) -> bytes:
    """Whole object at `url` (with retries). Raises ValueError if it is larger than max_bytes."""
    fs, path = open_fs(url, storage_options)
    attempts, base = retry_settings(storage_options)

    def once() -> bytes:
        if max_bytes is None:
            return fs.cat_file(path)
        try:  # one ranged GET on object stores (no HEAD)
            return fs.cat_file(path, start=0, end=max_bytes + 1)
        except OSError as e:  # S3 answers 416 for a range on a zero-byte object
            if "range" in str(e).lower() and "satisf" in str(e).lower():
                return fs.cat_file(path)
            raise

    data = with_retries(once, attempts, base, secrets=secrets_of(storage_options))
    if max_bytes is not None and len(data) > max_bytes:
        raise ValueError(f"object is larger than max_image_bytes={max_bytes}")
    return data
