"""Where a dataset lies: a local (or shared-filesystem) path, or a URL in object storage.

URLs go through fsspec's filesystems (s3fs, gcsfs, huggingface_hub's ``HfFileSystem``, aiohttp
for http(s)), each with its store's standard credential chain (``AWS_ENDPOINT_URL`` and friends
for an S3-compatible store); an ``s3://`` dataset's reads go through obstore where it is
installed (obstore_reads.py: the same store, less CPU per GB). :class:`Store` is the one place
fastload talks to a store: whole files or byte ranges read, files written, each call retried with
backoff on what a store or a network does transiently (5xx, a reset connection, a truncated body,
a stall past the timeout), then one :class:`StoreError` naming the URL and what failed.
"""
from __future__ import annotations

import functools
import hashlib
import os
import random
import re
import time
from pathlib import Path

from fastload.formats.errors import DatasetError

from . import obstore_reads

# scheme -> (the module fsspec needs for it, the fastload extra that installs it)
SCHEMES = {"s3": ("s3fs", "s3"), "gs": ("gcsfs", "gcs"), "gcs": ("gcsfs", "gcs"),
           "hf": ("huggingface_hub", None), "http": ("aiohttp", None), "https": ("aiohttp", None)}
WRITABLE = ("s3", "gs", "gcs", "hf")
# a request with no progress for this long is a stall: abandoned and retried
TIMEOUT_S = float(os.environ.get("FASTLOAD_STORE_TIMEOUT", 30))
RETRIES = 5          # tries per request beyond the first
BACKOFF_S = 0.25     # first wait between tries, doubled each time (with jitter), at most MAX_BACKOFF_S
MAX_BACKOFF_S = 8.0


class StoreError(DatasetError):
    """A store that failed (after retries), or refused a request; names the URL and what failed.
    ``kind``: 'missing' (no such object), 'bucket' (no such bucket, or an invalid name),
    'credentials' (refused or absent), 'permission' (valid credentials without the right),
    'refused' (either: the store did not say which), 'unreachable' (no connection), or 'failed'
    (retries spent), for callers that say more."""

    def __init__(self, message: str, kind: str = "failed"):
        super().__init__(message)
        self.kind = kind


def is_url(location) -> bool:
    """True for ``scheme://...`` other than ``file://`` (a local path)."""
    return isinstance(location, str) and "://" in location and not location.startswith("file://")


def local_path(location) -> Path:
    return Path(location[len("file://"):] if isinstance(location, str) and location.startswith("file://")
                else location)


def cache_name(url: str) -> str:
    """A URL's directory name on this node (its dataset's cache, a conversion's staging): readable,
    and unique by a hash of the whole URL."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", url.split("://", 1)[-1]).strip("_")[-80:]
    return f"{slug}-{hashlib.sha256(url.encode()).hexdigest()[:12]}"


# S3's bucket naming rules (which S3-compatible stores follow): checked before any request, since a
# store may answer a malformed name with "does not exist" (moto does) or only when writing
_S3_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


def check_bucket(url: str) -> None:
    """An ``s3://`` URL's bucket name is one S3 accepts, or one StoreError naming the rule."""
    if url.split("://", 1)[0].lower() != "s3":
        return
    bucket = bucket_of(url)
    if (not _S3_BUCKET.fullmatch(bucket) or ".." in bucket or re.fullmatch(r"[0-9.]+", bucket)):
        raise StoreError(f"{url}: {bucket!r} is not a valid S3 bucket name (3 to 63 lowercase letters, digits, dots "
                         "and hyphens, starting and ending with a letter or digit): check the URL", "bucket")


def bucket_of(url: str) -> str:
    return url.split("://", 1)[1].split("/", 1)[0]


def scheme_of(url: str) -> str:
    scheme = url.split("://", 1)[0].lower()
    if scheme not in SCHEMES:
        raise DatasetError(f"{url!r}: fastload does not read {scheme}:// locations (it reads "
                           f"{', '.join(s + '://' for s in SCHEMES)} and local paths)")
    return scheme


def _storage_options(scheme: str, timeout: float) -> dict:
    """Per-store settings: fastload's own retries are the policy (the clients' off, so a fault is
    retried once per try, not multiplied), with a timeout that turns a stall into an error."""
    if scheme == "s3":
        return {"config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": timeout,
                                  "read_timeout": timeout}}
    if scheme in ("http", "https"):
        import aiohttp
        return {"client_kwargs": {"timeout": aiohttp.ClientTimeout(sock_connect=timeout, sock_read=timeout)}}
    if scheme in ("gs", "gcs"):
        return {"timeout": timeout}
    return {}


@functools.cache
def _gcsfs_tried_once() -> None:
    """gcsfs retries every request 6 times with backoff up to 32 s, a policy fixed when its class
    is defined (``retry_request(retries=6)``), so a store that cannot be reached took minutes under
    fastload's own retries, each try printing a traceback to its logger. Here, once: its requests
    are tried once (fastload's ``Store._retry`` is the policy, as for s3fs and aiohttp), and its
    logger has a handler, so that its errors reach an application's logging, not stderr.
    Checked against gcsfs 2024.6 to 2026.10: ``_request`` wrapped by ``decorator``."""
    import logging

    import gcsfs
    from gcsfs import retry
    from gcsfs.core import GCSFileSystem
    logging.getLogger("gcsfs").addHandler(logging.NullHandler())
    request = GCSFileSystem._request
    major = int(gcsfs.__version__.split(".")[0])
    if not hasattr(request, "__wrapped__") or not 2024 <= major <= 2026:
        return  # another gcsfs: its own policy stays (slower to give up, but correct)
    GCSFileSystem._request = retry.retry_request(retries=1)(request.__wrapped__)


def _require_client(url: str) -> None:
    """The module fsspec needs for ``url``'s scheme is installed, or one line naming the extra."""
    import importlib.util
    scheme = scheme_of(url)
    module, extra = SCHEMES[scheme]
    if importlib.util.find_spec(module) is None:
        remedy = f"pip install 'fastload[{extra}]'" if extra else f"pip install {module}"
        raise DatasetError(f"{url}: reading {scheme}:// locations needs {module}: {remedy}")


def _filesystem(url: str, timeout: float):
    _require_client(url)
    scheme = scheme_of(url)
    module = SCHEMES[scheme][0]
    if module == "gcsfs":
        _gcsfs_tried_once()
    import fsspec
    fs, root = fsspec.core.url_to_fs(url, skip_instance_cache=True, **_storage_options(scheme, timeout))
    return fs, root.rstrip("/")


# the clients' own exception families: their network and server faults are worth another try
_CLIENT_MODULES = ("aiohttp", "botocore", "aiobotocore", "s3fs", "gcsfs", "google", "huggingface_hub", "requests",
                   "urllib3", "fsspec", "asyncio")


def _transient(e: BaseException) -> bool:
    """Worth another try: a network or server fault, not a missing key or a refused credential
    (nor a bug: a TypeError is raised at once)."""
    if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    if isinstance(e, OSError) and getattr(e, "errno", None) in (13, 2):
        return False
    if isinstance(e, (OSError, TimeoutError, ConnectionError)):
        return True
    return any(type(e).__module__.startswith(m) for m in _CLIENT_MODULES)


def _unreachable(e: BaseException) -> bool:
    """A connection that could not be made (refused, no route, no DNS), as each client names it."""
    names = ("EndpointConnectionError", "ConnectionRefusedError", "ClientConnectorError", "ConnectTimeout",
             "ConnectTimeoutError", "NewConnectionError", "gaierror")
    return any(n in type(x).__name__ for x in (e, e.__cause__, e.__context__) if x is not None for n in names)


# the stores' words for credentials that are wrong, expired or absent, and for a right that is not granted
_CREDENTIAL_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken",
                     "TokenRefreshRequired", "InvalidClientTokenId", "AuthorizationHeaderMalformed",
                     "NoCredentialsError", "PartialCredentialsError", "401"}
_PERMISSION_CODES = {"AccessDenied", "AllAccessDisabled", "AccountProblem"}
_CREDENTIALS_FROM = {"s3": "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE",
                     "gs": "GOOGLE_APPLICATION_CREDENTIALS, or gcloud auth application-default login",
                     "gcs": "GOOGLE_APPLICATION_CREDENTIALS, or gcloud auth application-default login",
                     "hf": "HF_TOKEN, or huggingface-cli login"}


def _refusal_code(e: BaseException) -> str | None:
    """The store's own code for a refusal (S3's error code, or botocore's class name for missing
    credentials), from the exception or what it was raised from."""
    for x in (e, e.__cause__, e.__context__):
        if x is None:
            continue
        if isinstance(x, obstore_reads.Refusal):
            return x.code
        if type(x).__name__ in ("NoCredentialsError", "PartialCredentialsError"):
            return type(x).__name__
        response = getattr(x, "response", None)
        if isinstance(response, dict) and response.get("Error", {}).get("Code"):
            return str(response["Error"]["Code"])
        status = getattr(x, "code", None) or getattr(x, "status", None)
        if status in (401, 403):
            return str(status)
    return None


class Store:
    """A dataset location in object storage (``url``: the dataset's prefix). Paths given to its
    methods are the manifest's, relative to that prefix. A fork-safe handle: a child process
    (a DataLoader worker) makes its own client on first use."""

    def __init__(self, url: str, retries: int = RETRIES, timeout: float | None = None):
        self.url = url.rstrip("/")
        self.scheme = scheme_of(url)
        check_bucket(self.url)
        self.retries, self.timeout = retries, TIMEOUT_S if timeout is None else timeout
        self._fs, self._root, self._pid, self._reads, self._reads_pid = None, None, None, None, None
        _require_client(self.url)  # a missing extra fails here, not at the first read
        if self.scheme == "s3":  # s3fs's path; s3fs itself is imported when first used (0.25 s of a
            self._root = self.url.split("://", 1)[1]  # cold start: reads go through obstore)
        else:
            self.fs  # a malformed URL fails here too

    def __getstate__(self):
        return {**self.__dict__, "_fs": None, "_pid": None, "_reads": None, "_reads_pid": None}

    @property
    def fs(self):
        if self._fs is None or self._pid != os.getpid():
            self._fs, self._root = _filesystem(self.url, self.timeout)
            self._pid = os.getpid()
        return self._fs

    @property
    def client(self) -> str:
        """What reads this store's bytes in this process: 'obstore' or 'fsspec' (decided at the
        process's first read)."""
        if self._reads_pid != os.getpid():
            self._reads = (obstore_reads.S3Reads.for_bucket(bucket_of(self.url), self.timeout)
                           if self.scheme == "s3" else None)
            self._reads_pid = os.getpid()
        return "obstore" if self._reads else "fsspec"

    def key(self, relative: str) -> str:
        return f"{self._root}/{relative}" if relative else self._root

    def url_of(self, relative: str) -> str:
        return f"{self.url}/{relative}"

    def _retry(self, what: str, relative: str, call):
        """``call()``, tried up to 1 + retries times with exponential backoff and jitter."""
        delay = BACKOFF_S
        for attempt in range(self.retries + 1):
            try:
                return call()
            except Exception as e:
                code = _refusal_code(e)
                if code in _CREDENTIAL_CODES or code in _PERMISSION_CODES or code == "403":
                    raise self._refused(relative, what, code, e) from None
                if not _transient(e) and not isinstance(e, (FileNotFoundError, PermissionError, OSError)):
                    raise
                if not _transient(e):
                    if isinstance(e, FileNotFoundError) and "bucket" in str(e).lower():
                        raise StoreError(f"{self.url_of(relative)}: the bucket {bucket_of(self.url)!r} does not "
                                         f"exist ({what}): create it, or check the URL", "bucket") from None
                    missing = isinstance(e, FileNotFoundError)
                    raise StoreError(f"{self.url_of(relative)} {'does not exist' if missing else f'was refused ({e})'} "
                                     f"({what})", "missing" if missing else "refused") from None
                if attempt == self.retries:
                    last = f"{type(e).__name__}: {str(e)[:300]}"
                    if _unreachable(e):
                        endpoint = " and AWS_ENDPOINT_URL" if self.scheme == "s3" else ""
                        raise StoreError(f"{self.url_of(relative)}: the store cannot be reached ({what}, "
                                         f"{self.retries + 1} tries; the last: {last}): check the network{endpoint}",
                                         "unreachable") from None
                    raise StoreError(f"{self.url_of(relative)}: {what} failed {self.retries + 1} times; the "
                                     f"last: {last}") from None
                time.sleep(min(delay, MAX_BACKOFF_S) * (0.5 + random.random()))
                delay *= 2

    def _refused(self, relative: str, what: str, code: str, e: BaseException) -> StoreError:
        """One line for a refusal, by its cause: credentials the store does not accept (or none), a
        right the credentials lack, or (a bare 403, as a HEAD request gets) one of the two."""
        writing = what.startswith(("upload", "writ", "remov", "delet"))
        url = self.url if writing else self.url_of(relative)  # a write is refused for the prefix
        where = _CREDENTIALS_FROM.get(self.scheme, "the store's credentials")
        if code == "403":  # no body to say why (a HEAD; a streamed GET's body is not parsed): ask a listing
            code = self._listing_refusal(relative) or "AccessDenied"  # listed, or only the listing refused: the right
        if code in _CREDENTIAL_CODES:
            said = "no credentials were found" if "Credentials" in code else f"the store refused the credentials ({code})"
            return StoreError(f"{url}: {said} ({what}): set {where}", "credentials")
        right = "write under" if writing else "read"
        if code in _PERMISSION_CODES:
            return StoreError(f"{url}: the credentials have no permission to {right} it ({code}, {what}): grant it "
                              f"to them for this prefix, or use credentials that have it ({where})", "permission")
        return StoreError(f"{url}: the store refused the request (403, {what}): the credentials are wrong or have "
                          f"no permission to {right} it; check {where}", "refused")

    def _listing_refusal(self, relative: str) -> str | None:
        """The code of a listing of the file's folder, a request whose refusal has a parsed body:
        None where the listing is allowed."""
        try:
            self.fs.ls(self.key(relative).rsplit("/", 1)[0], refresh=True)
        except Exception as e:
            return _refusal_code(e)
        return None

    def read(self, relative: str, start: int | None = None, end: int | None = None, size: int | None = None):
        """Bytes ``start..end`` of a file (all of it without them), as a buffer (``bytes``, or
        obstore's ``Bytes``: ``len()`` and the buffer protocol). A body of another length than
        asked (``size`` for a whole file) is a truncated transfer: retried like any fault."""
        want = end - start if start is not None and end is not None else size

        def call():
            if self.client == "obstore":
                data = self._reads.get(self.key(relative).split("/", 1)[1], start, end)
            else:
                data = self.fs.cat_file(self.key(relative), start=start, end=end)
            if want is not None and len(data) != want:
                raise OSError(f"truncated body: {len(data)} of {want} bytes")
            return data
        span = f"bytes {start}..{end}" if start is not None else "the file"
        return self._retry(f"reading {span}", relative, call)

    def size(self, relative: str) -> int:
        return int(self._retry("its size", relative, lambda: self.fs.info(self.key(relative))["size"]))

    def exists(self, relative: str) -> bool:
        return bool(self._retry("checking it", relative, lambda: self.fs.exists(self.key(relative))))

    def put(self, local: Path, relative: str) -> None:
        """Upload file ``local`` to ``relative`` (a whole object: readers never see part of it)."""
        if self.scheme not in WRITABLE:
            raise StoreError(f"{self.url}: {self.scheme}:// locations are read-only for fastload: write the dataset "
                             "to s3://, gs://, hf:// or a path, and serve it from there")
        self._retry("uploading", relative, lambda: self.fs.put_file(str(local), self.key(relative)))

    def check_writable(self) -> None:
        """Write and remove a small object under the prefix: a missing bucket or a refused write is
        said now, not after a conversion of hours (one StoreError naming the cause)."""
        import tempfile
        probe = f".fastload-write-check-{os.getpid()}"
        with tempfile.NamedTemporaryFile(prefix="fastload-") as f:
            self.put(Path(f.name), probe)
        self.remove(probe)

    def remove(self, relative: str) -> None:
        self._retry("removing", relative, lambda: self.fs.rm_file(self.key(relative)))
