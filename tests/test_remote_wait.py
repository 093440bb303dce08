"""flows.remote: what a deployment run that has not started yet is said to wait for, and which of
those waits count against worker_wait_s. Prefect gives several states of type SCHEDULED; a preempted
run's AwaitingRetry was told as waiting for a concurrency slot, and waited without a limit."""

from prefect.states import AwaitingConcurrencySlot, AwaitingRetry, Late, Scheduled

from flows.remote import _UNTAKEN, waiting_for


def test_each_scheduled_state_is_said_as_what_it_waits_for():
    said = {s.name: waiting_for(s.name) for s in (Scheduled(), Late(), AwaitingRetry(), AwaitingConcurrencySlot())}
    assert all(s.type.value == "SCHEDULED" for s in (Scheduled(), Late(), AwaitingRetry(), AwaitingConcurrencySlot()))
    assert said["Scheduled"] == said["Late"] == "a worker"
    assert said["AwaitingRetry"].startswith("a worker to resume it") and "stopped" in said["AwaitingRetry"]
    assert "concurrency slot" in said["AwaitingConcurrencySlot"]
    assert not any("concurrency" in said[n] for n in ("Scheduled", "Late", "AwaitingRetry"))


def test_a_rescheduled_run_waits_for_a_worker_within_the_limit_and_a_slot_wait_does_not_count():
    assert {"Scheduled", "Late", "AwaitingRetry"} <= _UNTAKEN
    assert "AwaitingConcurrencySlot" not in _UNTAKEN  # taken in turn once the other run ends: no worker is missing
