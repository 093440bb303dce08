"""Time limits and bounded retries for every S3 call cloob makes (registry, results, checkpoints,
shards, manifests): a store that stops answering ends a command with an error instead of a hang.

cloob.storage registers `LimitedS3FileSystem` as fsspec's "s3" implementation, so Location and a
plain fsspec.open("s3://...") anywhere in the process get it; the class is imported (with s3fs)
only when an s3:// URL is first opened. Limits come from the environment when a file system is
made (a cached instance keeps the ones it was made with):

    CLOOB_S3_CONNECT_TIMEOUT  seconds to open a connection (default 5, s3fs's)
    CLOOB_S3_READ_TIMEOUT     seconds to wait for the next bytes of an answer (default 15, s3fs's)
    CLOOB_S3_MAX_ATTEMPTS     tries of one request, the first included (default AWS_MAX_ATTEMPTS, else 3)
    CLOOB_S3_RETRY_MODE       botocore's retry mode (default AWS_RETRY_MODE, else standard)

Without them botocore retried a timed-out request 5 times (legacy mode) and s3fs retried each of its
calls 5 times around that: 25 tries of 15 s, the 400 s silent hang of the fault report (B3). Here
botocore's attempts do the retrying and s3fs adds one retry of its own (it also covers a body that
breaks off while being read, which botocore does not retry): a call that gets no answer ends after
about 2 x MAX_ATTEMPTS x READ_TIMEOUT seconds plus the back-off (about 95 s with the defaults).
"""

from __future__ import annotations

import os
from urllib.parse import urlsplit, urlunsplit

import s3fs

from cloob.errors import CloobError
from cloob.settings import env_number

S3FS_TRIES = 2  # s3fs's own loop around botocore's attempts

_NUMBERS = {"CLOOB_S3_CONNECT_TIMEOUT": 5.0, "CLOOB_S3_READ_TIMEOUT": 15.0}
_MODES = ("standard", "adaptive", "legacy")


def limits() -> dict:
    """botocore Config settings (s3fs's config_kwargs) from the environment; CloobError for a bad value."""
    attempts = env_number("CLOOB_S3_MAX_ATTEMPTS", int(os.environ.get("AWS_MAX_ATTEMPTS") or 3), integer=True, positive=True)
    mode = (os.environ.get("CLOOB_S3_RETRY_MODE") or os.environ.get("AWS_RETRY_MODE") or "standard").strip()
    if mode not in _MODES:
        raise CloobError(f"CLOOB_S3_RETRY_MODE={mode!r} is not a botocore retry mode",
                         f"use one of {', '.join(_MODES)}, or unset it (standard)")
    return {"connect_timeout": env_number("CLOOB_S3_CONNECT_TIMEOUT", _NUMBERS["CLOOB_S3_CONNECT_TIMEOUT"], positive=True),
            "read_timeout": env_number("CLOOB_S3_READ_TIMEOUT", _NUMBERS["CLOOB_S3_READ_TIMEOUT"], positive=True),
            "retries": {"mode": mode, "total_max_attempts": attempts}}  # total: the first try included


def describe(cfg: dict | None = None) -> str:
    """The limits in words, for error messages."""
    cfg = cfg or limits()
    return (f"{cfg['retries']['total_max_attempts']} attempts of {cfg['connect_timeout']:g} s to connect and "
            f"{cfg['read_timeout']:g} s to answer")


class LimitedS3FileSystem(s3fs.S3FileSystem):
    """s3fs with cloob's time limits; config_kwargs given explicitly win over them."""

    retries = S3FS_TRIES

    def __init__(self, *args, config_kwargs: dict | None = None, **kwargs):
        _refuse_credentials_in(kwargs.get("endpoint_url") or (kwargs.get("client_kwargs") or {}).get("endpoint_url")
                               or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"))
        super().__init__(*args, config_kwargs={**limits(), **(config_kwargs or {})}, **kwargs)


def _refuse_credentials_in(endpoint: str | None) -> None:
    """aiohttp refuses a request to an endpoint with user:password@ in it, after every retry, with a
    traceback; say so at once, without the credentials."""
    if endpoint and "@" in urlsplit(endpoint).netloc:
        shown = urlunsplit(urlsplit(endpoint)._replace(netloc=urlsplit(endpoint).netloc.rsplit("@", 1)[1]))
        raise CloobError(f"the S3 endpoint {shown} was given with a user name and password in it, which the S3 client "
                         "cannot use", "give the endpoint without user:password@ (--endpoint-url or AWS_ENDPOINT_URL) "
                         "and the credentials as AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or an AWS profile)")


# One instance cache with s3fs's own (the class is part of each key): code that clears
# S3FileSystem's cache, as the tests do when they point AWS_ENDPOINT_URL elsewhere, clears ours.
LimitedS3FileSystem._cache = s3fs.S3FileSystem._cache
