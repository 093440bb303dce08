"""`python -m cloob.run.torchrun ...`: torchrun (torch.distributed.run) that stops when its launcher dies
and reports how its ranks ended as data.

`cloob.run.launch` runs this instead of torchrun itself. If the launching process disappears without
stopping the run (killed with SIGKILL, a crashed worker), torchrun gets SIGTERM and stops its ranks
as on any SIGTERM, instead of training on unsupervised.

Under the launcher (CLOOB_REPORT_DIR set) a failed rank is not also told as torchrun's 40-line
ChildFailedError report and traceback: how each rank ended goes to torchrun.json (cloob.run.reports),
the ranks' own errors are in their error files, and the launcher tells the user once; torchrun's own
log is quiet then (CLOOB_LOG_LEVEL set: as usual). A SIGTERM (the run being stopped) ends it quietly
with 128 + the signal number.

Two more things under the launcher, each a small wrapper around a part of torch's agent:
- each restart of the group after a failure (--max_restarts, train.max_restarts) is written down
  (restart-<N>.json, with how the failed ranks ended), for the launcher to say so in one line;
- only the first stop signal counts. On SIGTERM the agent passes it to its ranks and waits up to
  its shutdown timeout (TORCH_ELASTIC_SHUTDOWN_TIMEOUT, set by the launcher from train.stop_grace_s)
  for them to save and exit; a second signal in that wait (flows.signals and the launcher each send
  one, Kubernetes may repeat it) would raise again inside the wait and leave at once, and the ranks,
  tied to this process (cloob.run.lifeline), would die before their checkpoint is written. The
  launcher's SIGKILL after its grace period stays the limit.
"""

import logging
import os
import signal
import sys

from cloob.run.lifeline import die_with_parent


def _failure(f) -> dict:
    """How one rank ended, from torch's ProcessFailure."""
    return {"exitcode": f.exitcode, "signal": f.signal_name() if f.exitcode < 0 else None, "pid": f.pid,
            "local_rank": f.local_rank, "time": f.timestamp}


def _report_restarts() -> None:
    from torch.distributed.elastic.agent.server.api import SimpleElasticAgent, WorkerState
    from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent

    from cloob.run import reports

    monitor, restart = LocalElasticAgent._monitor_workers, SimpleElasticAgent._restart_workers

    def monitor_workers(self, worker_group):
        result = monitor(self, worker_group)
        self._cloob_last_result = result
        return result

    def restart_workers(self, worker_group):
        result = getattr(self, "_cloob_last_result", None)
        failed = result is not None and result.state in (WorkerState.FAILED, WorkerState.UNHEALTHY)
        restart(self, worker_group)  # stops the group and starts it anew (a rendezvous first)
        if failed:  # not a restart for nodes joining, which torchrun does not count either
            spec = worker_group.spec
            reports.write_restart(spec.max_restarts - self._remaining_restarts, spec.max_restarts,
                                  {rank: _failure(f) for rank, f in result.failures.items()})

    LocalElasticAgent._monitor_workers, SimpleElasticAgent._restart_workers = monitor_workers, restart_workers


def _first_signal_only() -> None:
    from torch.distributed.elastic.multiprocessing import api

    handler, seen = api._terminate_process_handler, []

    def once(signum, frame):
        if seen:
            return  # already stopping: the ranks have it and are saving
        seen.append(signum)
        handler(signum, frame)

    api._terminate_process_handler = once  # looked up by name when the agent installs its handlers


def main() -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun
    from torch.distributed.run import parse_args, run

    from cloob.run import rank_fork, reports

    if reports.report_dir() is None:  # run by hand: torchrun as it is
        torchrun()
        return 0
    _report_restarts()
    _first_signal_only()
    if not os.environ.get("CLOOB_LOG_LEVEL"):
        # Its log says again what the reports say ("failed (exitcode: 2) local_rank: 0 ..."); each
        # elastic module's logger has its level set on its own (torch's LOGLEVEL, default WARNING).
        for name, logger in list(logging.root.manager.loggerDict.items()):
            if name.startswith(("torch.distributed.elastic", "torch.distributed.run")) and \
                    isinstance(logger, logging.Logger):
                logger.setLevel(logging.CRITICAL)
    args = parse_args(sys.argv[1:])
    rank_fork.install(args.training_script, args.module, args.training_script_args)
    try:
        run(args)
    except ChildFailedError as e:
        reports.write_failures({rank: _failure(f) for rank, f in e.failures.items()})
        return 1
    except SignalException as e:
        return 128 + int(e.sigval)
    return 0


if __name__ == "__main__":
    launcher = os.environ.get("CLOOB_LAUNCHER_PID")
    die_with_parent(signal.SIGTERM, int(launcher) if launcher else None)
    sys.exit(main())
