"""Riding out a Prefect server that is away for a while: a restart, an upgrade, a database failover.

A pipeline waits hours for its trainings; the server it asks may be restarted meanwhile. Prefect's
client retries a refused connection with an exponential back-off, PREFECT_CLIENT_MAX_RETRIES times
(default 5: about a minute), and then raises its bare `ConnectError`, which used to fail the
pipeline while the training on the worker went on and finished. Calls made through `Outage.call`
retry instead for up to CLOOB_API_OUTAGE_S seconds in all (default 600), then fail with one message
that says what to do. The Prefect engines' own calls (a task's end state) are made to ride out the
same outage through `engine_retries`.
"""

from __future__ import annotations

import logging
import time

from cloob.errors import CloobError

ENV = "CLOOB_API_OUTAGE_S"
API_OUTAGE_S = 600.0
RETRY_S = 2.0
# Prefect's client waits 2, 4, 8 ... 2**n s between tries: 8 tries cover 510 s (plus jitter), about
# CLOOB_API_OUTAGE_S's default.
ENGINE_RETRIES = 8


def outage_limit_s() -> float:
    """How long a lost Prefect server is waited for (CLOOB_API_OUTAGE_S, seconds)."""
    from cloob.settings import env_number

    return env_number(ENV, API_OUTAGE_S)


def is_outage(exc: BaseException) -> bool:
    """The server did not answer (refused, reset, timed out) or its proxy said it is away (502-504):
    worth waiting for. Any other error (404, a bad request) is not."""
    import httpx
    from prefect.exceptions import PrefectHTTPStatusError

    if isinstance(exc, httpx.TransportError):
        return True
    return isinstance(exc, PrefectHTTPStatusError) and exc.response.status_code in (502, 503, 504)


def _api_url() -> str:
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value() or "(PREFECT_API_URL unset)"


class Outage:
    """Calls to the server that an outage must not fail. `call(fn, ...)` returns fn's result, retrying
    every RETRY_S while the server does not answer; it gives up (CloobError) once one outage has
    lasted `limit_s` (None: CLOOB_API_OUTAGE_S). `what` names what was being waited for, for the message.
    `ended_at` is when the last outage ended (time.monotonic()), for callers that time other things."""

    def __init__(self, what: str, logger: logging.Logger | logging.LoggerAdapter, limit_s: float | None = None,
                 clock=time.monotonic, sleep=time.sleep):
        self.what, self.logger = what, logger
        self.limit_s = outage_limit_s() if limit_s is None else limit_s
        self.clock, self.sleep = clock, sleep
        self.since: float | None = None
        self.ended_at: float | None = None

    def call(self, fn, *args, **kwargs):
        from prefect.settings import PREFECT_CLIENT_MAX_RETRIES, temporary_settings

        while True:
            try:
                # No retries of Prefect's own: this loop is the retry, with a deadline it can state.
                with temporary_settings(updates={PREFECT_CLIENT_MAX_RETRIES: 0}):
                    out = fn(*args, **kwargs)
            except Exception as e:
                if not is_outage(e):
                    raise
                self._failed(e)
                continue
            if self.since is not None:
                self.ended_at = self.clock()
                self.logger.warning("the Prefect server at %s answers again after %.0f s; still waiting for %s",
                                    _api_url(), self.ended_at - self.since, self.what)
                self.since = None
            return out

    def _failed(self, e: Exception) -> None:
        import httpx

        now = self.clock()
        # Prefect's text of a 503 runs to three lines with a link; the status says it.
        response = getattr(e, "response", None)
        error = (f"HTTP {response.status_code} {response.reason_phrase}" if response is not None and
                 not isinstance(e, httpx.TransportError) else f"{type(e).__name__}: {e}".strip().rstrip(":"))
        if self.since is None:
            self.since = now
            # A 503 is an answer, from a server busy starting or a proxy in front of one that is away.
            away = "does not answer" if isinstance(e, httpx.TransportError) else "is unavailable"
            self.logger.warning("the Prefect server at %s %s (%s); retrying for up to %.0f s (%s) while waiting "
                                "for %s", _api_url(), away, error, self.limit_s, ENV, self.what)
        elif now - self.since >= self.limit_s:
            raise CloobError(f"lost the Prefect server at {_api_url()}: no answer for {now - self.since:.0f} s "
                             f"({ENV}={self.limit_s:.0f}) while waiting for {self.what} ({error})",
                             "start the server again (or fix PREFECT_API_URL or the network), then rerun the "
                             "pipeline: it resumes where it stopped and finds what finished meanwhile in the store; "
                             f"to wait longer for a server, raise {ENV}") from e
        self.sleep(RETRY_S)


def engine_retries():
    """A settings context in which Prefect's own client retries a lost server about as long as Outage
    waits (at least ENGINE_RETRIES tries, or PREFECT_CLIENT_MAX_RETRIES if set higher): for the calls a
    flow or task engine makes by itself, such as a task's Completed state at the end of a training."""
    from prefect.settings import PREFECT_CLIENT_MAX_RETRIES, temporary_settings

    return temporary_settings(updates={PREFECT_CLIENT_MAX_RETRIES: max(ENGINE_RETRIES, PREFECT_CLIENT_MAX_RETRIES.value())})
