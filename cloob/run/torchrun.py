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
"""

import logging
import os
import signal
import sys

from cloob.run.lifeline import die_with_parent


def main() -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun
    from torch.distributed.run import parse_args, run

    from cloob.run import reports

    if reports.report_dir() is None:  # run by hand: torchrun as it is
        torchrun()
        return 0
    if not os.environ.get("CLOOB_LOG_LEVEL"):
        # Its log says again what the reports say ("failed (exitcode: 2) local_rank: 0 ..."); each
        # elastic module's logger has its level set on its own (torch's LOGLEVEL, default WARNING).
        for name, logger in list(logging.root.manager.loggerDict.items()):
            if name.startswith(("torch.distributed.elastic", "torch.distributed.run")) and \
                    isinstance(logger, logging.Logger):
                logger.setLevel(logging.CRITICAL)
    try:
        run(parse_args(sys.argv[1:]))
    except ChildFailedError as e:
        reports.write_failures({rank: {"exitcode": f.exitcode, "signal": f.signal_name() if f.exitcode < 0 else None,
                                       "pid": f.pid, "local_rank": f.local_rank, "time": f.timestamp}
                                for rank, f in e.failures.items()})
        return 1
    except SignalException as e:
        return 128 + int(e.sigval)
    return 0


if __name__ == "__main__":
    launcher = os.environ.get("CLOOB_LAUNCHER_PID")
    die_with_parent(signal.SIGTERM, int(launcher) if launcher else None)
    sys.exit(main())
