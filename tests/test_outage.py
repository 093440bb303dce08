"""flows.outage without a server: what is waited for, for how long, and the one message after."""

import logging

import httpx
import pytest

from cloob.errors import CloobError
from flows.outage import Outage, is_outage, outage_limit_s


class _Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t

    def sleep(self, s: float) -> None:
        self.t += s


def _flaky(failures: int):
    calls = {"n": 0}

    def fn():
        calls["n"] += 1
        if calls["n"] <= failures:
            raise httpx.ConnectError("[Errno 111] Connection refused")
        return "answer"
    return fn, calls


def test_an_outage_shorter_than_the_limit_is_ridden_out_and_said(caplog):
    clock = _Clock()
    outage = Outage("flow run train-x of cloob-train/gpu", logging.getLogger("t"), limit_s=60, clock=clock,
                    sleep=clock.sleep)
    fn, calls = _flaky(10)  # 20 s of refusals
    with caplog.at_level(logging.WARNING):
        assert outage.call(fn) == "answer"
    assert calls["n"] == 11 and outage.ended_at == 20.0
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 2 and "does not answer (ConnectError: [Errno 111] Connection refused)" in said[0]
    assert "retrying for up to 60 s (CLOOB_API_OUTAGE_S)" in said[0] and "answers again after 20 s" in said[1]


def test_an_outage_longer_than_the_limit_is_one_error_with_the_fix():
    clock = _Clock()
    outage = Outage("flow run train-x of cloob-train/gpu", logging.getLogger("t"), limit_s=10, clock=clock,
                    sleep=clock.sleep)
    fn, _ = _flaky(1000)
    with pytest.raises(CloobError) as e:
        outage.call(fn)
    text = str(e.value)
    assert "lost the Prefect server at" in text and "no answer for 10 s (CLOOB_API_OUTAGE_S=10)" in text
    assert "while waiting for flow run train-x of cloob-train/gpu" in text
    assert text.count("fix:") == 1 and "start the server again" in text and "rerun the pipeline" in text


def test_other_errors_are_not_waited_for(monkeypatch):
    def bad():
        raise ValueError("a bug")

    with pytest.raises(ValueError):
        Outage("x", logging.getLogger("t"), limit_s=10).call(bad)
    assert is_outage(httpx.ReadTimeout("slow")) and not is_outage(ValueError())
    monkeypatch.setenv("CLOOB_API_OUTAGE_S", "90")
    assert outage_limit_s() == 90
    monkeypatch.setenv("CLOOB_API_OUTAGE_S", "soon")
    with pytest.raises(CloobError, match="CLOOB_API_OUTAGE_S='soon' is not a non-negative number"):
        outage_limit_s()


def test_a_server_answering_503_is_waited_for_and_named_briefly(caplog):
    from prefect.exceptions import PrefectHTTPStatusError

    request = httpx.Request("GET", "http://127.0.0.1:1/api/flow_runs/x")
    busy = PrefectHTTPStatusError("Server error '503 Service Unavailable' … For more information check: …",
                                  request=request, response=httpx.Response(503, request=request))
    clock, calls = _Clock(), {"n": 0}

    def fn():
        calls["n"] += 1
        if calls["n"] == 1:
            raise busy
        return "answer"

    with caplog.at_level(logging.WARNING):
        assert Outage("x", logging.getLogger("t"), limit_s=10, clock=clock, sleep=clock.sleep).call(fn) == "answer"
    assert "is unavailable (HTTP 503 Service Unavailable)" in caplog.records[0].getMessage()
