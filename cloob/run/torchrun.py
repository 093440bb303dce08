"""`python -m cloob.run.torchrun ...`: torchrun (torch.distributed.run) that stops when its launcher dies.

`cloob.run.launch` runs this instead of torchrun itself. If the launching process disappears without
stopping the run (killed with SIGKILL, a crashed worker), torchrun gets SIGTERM and stops its ranks
as on any SIGTERM, instead of training on unsupervised.
"""

import os
import signal

from cloob.run.lifeline import die_with_parent

if __name__ == "__main__":
    launcher = os.environ.get("CLOOB_LAUNCHER_PID")
    die_with_parent(signal.SIGTERM, int(launcher) if launcher else None)
    from torch.distributed.run import main

    main()
