"""Byte-range reads of ``s3://`` objects through obstore (Rust's object_store): the hot path of a
remote dataset (its units and samples), at about two thirds of s3fs's CPU per GB and a sixth more
MB/s (scripts/bench_store_client.py). Sizes, listings, uploads and the diagnosis of a refusal stay
on fsspec (location.py), where time does not matter.

The one place fastload touches obstore:
- the same store as s3fs would reach: botocore's credential chain (environment, ``AWS_PROFILE``,
  SSO, instance and container roles) handed to obstore as a credential provider, the endpoint of
  ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` / the profile, botocore's CA bundle
  (``AWS_CA_BUNDLE``: a store behind a private CA), and the bucket's own region;
- fastload's policy on top (location.py's ``Store._retry``): obstore's retries off, a request
  that makes no progress for the store timeout abandoned;
- its errors said in the words ``Store._retry`` classifies (a refusal's code, a missing key or
  bucket, a connection that could not be made, a transient fault);
- fork: obstore's tokio runtime does not survive a fork (a forked child's first request hangs,
  measured with obstore 0.12), so a process forked from one that used obstore reads through
  fsspec instead (a DataLoader worker of the reference backend: ``usable()`` is False there).
"""
from __future__ import annotations

import datetime
import os
import re
import threading

CLIENT_ENV = "FASTLOAD_S3_CLIENT"  # "fsspec": every read through s3fs (a store obstore cannot reach)
MIN_VERSION = (0, 8)  # credential providers, read_timeout, get_range with start/end: obstore >= 0.8
_started_in: int | None = None  # the pid whose obstore runtime has run (inherited by a fork)
_lock = threading.Lock()


def available() -> bool:
    """obstore is installed, recent enough, not declined ($FASTLOAD_S3_CLIENT=fsspec), and not
    inherited across a fork from a process that used it."""
    if os.environ.get(CLIENT_ENV, "").lower() == "fsspec":
        return False
    if _started_in is not None and _started_in != os.getpid():
        return False
    try:
        import obstore
    except ImportError:
        return False
    version = tuple(int(x) for x in re.findall(r"\d+", obstore.__version__)[:2])
    return version >= MIN_VERSION


class Refusal(Exception):
    """A request the store refused, with its code (S3's error code, or the HTTP status)."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


class _BotocoreCredentials:
    """botocore's credential chain as obstore's credential provider; refreshed by botocore, asked
    again every few minutes (a role's temporary credentials expire)."""

    def __init__(self, credentials):
        self.credentials = credentials

    def __call__(self) -> dict:
        frozen = self.credentials.get_frozen_credentials()
        return {"access_key_id": frozen.access_key, "secret_access_key": frozen.secret_key, "token": frozen.token,
                "expires_at": datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(minutes=5)}


def _endpoint(session) -> str | None:
    return (os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
            or session.get_config_variable("endpoint_url") or None)


def _bucket_region(bucket: str, fallback: str, timeout: float) -> str:
    """The region AWS keeps the bucket in (an unsigned HEAD answers it in ``x-amz-bucket-region``,
    even when it refuses: object_store's ``resolve_bucket_region``); ``fallback`` if it cannot say."""
    import urllib.error
    import urllib.request
    request = urllib.request.Request(f"https://{bucket}.s3.amazonaws.com", method="HEAD")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return r.headers.get("x-amz-bucket-region") or fallback
    except urllib.error.HTTPError as e:
        return e.headers.get("x-amz-bucket-region") or fallback
    except OSError:
        return fallback


class S3Reads:
    """``get(key, start, end)``: the bytes of an object in one bucket, as a buffer (obstore's
    ``Bytes``: no copy into a Python ``bytes``). Built in the process that uses it."""

    def __init__(self, bucket: str, timeout: float):
        self.bucket, self.timeout = bucket, timeout
        self._store = None

    def __getstate__(self):
        return {**self.__dict__, "_store": None}

    @classmethod
    def for_bucket(cls, bucket: str, timeout: float) -> "S3Reads | None":
        """A reader, or None where obstore cannot stand in for s3fs here (not installed, a forked
        process, or no credentials found: s3fs then says which, as before)."""
        if not available():
            return None
        import botocore.session
        if botocore.session.get_session().get_credentials() is None:
            return None
        return cls(bucket, timeout)

    def _make(self):
        global _started_in
        import botocore.session
        from obstore.store import S3Store
        session = botocore.session.get_session()
        endpoint = _endpoint(session)
        region = session.get_config_variable("region") or "us-east-1"
        if endpoint is None:
            region = _bucket_region(self.bucket, region, self.timeout)
        timeout = datetime.timedelta(seconds=self.timeout)
        options = {"connect_timeout": timeout, "read_timeout": timeout,
                   "timeout": datetime.timedelta(hours=1),  # a whole request: the stall timeouts above bound it
                   "allow_http": bool(endpoint and endpoint.startswith("http://"))}
        ca_bundle = session.get_config_variable("ca_bundle")
        if ca_bundle and os.path.isfile(ca_bundle):  # added to the system's roots, as botocore trusts it
            with open(ca_bundle, "rb") as f:
                options["root_certificate"] = f.read()
        store = S3Store(self.bucket, region=region, client_options=options, retry_config={"max_retries": 0},
                        credential_provider=_BotocoreCredentials(session.get_credentials()),
                        **({"endpoint": endpoint} if endpoint else {}))
        with _lock:
            _started_in = os.getpid()
        return store

    def get(self, key: str, start: int | None, end: int | None):
        import obstore
        if self._store is None:
            self._store = self._make()
        try:
            if start is None:
                return obstore.get(self._store, key).bytes()
            return obstore.get_range(self._store, key, start=start, end=end)
        except obstore.exceptions.BaseError as e:
            raise _translated(e, self.bucket, key) from e


_S3_CODE = re.compile(r"<Code>([A-Za-z]+)</Code>")
_CANNOT_CONNECT = ("error trying to connect", "Connection refused", "dns error", "failed to lookup address",
                   "No route to host", "tcp connect error")


def _translated(e, bucket: str, key: str) -> Exception:
    """obstore's error in the words location.py's retry classifies."""
    from obstore import exceptions as x
    text = str(e)
    code = _S3_CODE.search(text)
    code = code.group(1) if code else None
    if isinstance(e, x.NotFoundError) or code in ("NoSuchKey", "NoSuchBucket"):
        where = f"the bucket {bucket!r} does not exist" if code == "NoSuchBucket" else f"{key}: not found"
        return FileNotFoundError(where)
    if isinstance(e, (x.PermissionDeniedError, x.UnauthenticatedError)) or code in ("AccessDenied",
                                                                                      "InvalidAccessKeyId",
                                                                                      "SignatureDoesNotMatch"):
        status = "401" if isinstance(e, x.UnauthenticatedError) else "403"
        return Refusal(code or status, text.splitlines()[0][:300])
    if any(s in text for s in _CANNOT_CONNECT):
        return ConnectionRefusedError(text.splitlines()[0][:300])
    return OSError(text.splitlines()[0][:300] if text else type(e).__name__)  # a server or network fault: tried again
