"""One evaluation per pair at a time: the lock an evaluation holds on its (checkpoint, set, settings).

The "already in results" check (cloob.evaluate.pairs.previous_row) alone lets two evaluations of
the same pair that start together (two pipelines, a study and a manual `cloob evaluate`) both run
and both append a row. So an evaluation claims its pair first: the lock
`<results>/locks/<pair key>.json` (cloob.lock, the run and dataset folders' lock, so it works on a
local folder and on S3 alike, and a holder that died is taken over at once on its machine, after the
lease elsewhere). A second evaluation of the pair waits for the first to finish, then looks at the
results again and finds its row.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import posixpath
import sys
import time

from cloob.lock import LockHeld, folder_lock

LOCKS = "locks"
POLL_S = 1.0


def pair_key(identity: dict, dataset_name: str, dataset_identity: str, settings_hash: str) -> str:
    """What makes two evaluations the same pair (previous_row's rule), as a file name."""
    key = [identity.get("checkpoint_id"), identity.get("run_id"), dataset_name, dataset_identity, settings_hash]
    return hashlib.sha256(json.dumps(key).encode()).hexdigest()[:24]


@contextlib.contextmanager
def claim_pair(results: str, key: str, label: str, poll_s: float = POLL_S):
    """Hold the pair's lock for the block; wait (saying so once, on stderr) while another holds it."""
    said = False
    while True:
        lock = folder_lock(posixpath.join(results, LOCKS), name=f"{key}.json", purpose=f"cloob evaluate {label}",
                           label=f"the evaluation of {label}")
        try:
            lock.acquire()
            break
        except LockHeld as e:
            if not said:
                h = e.holder
                print(f"{label}: waiting for another evaluation of it (pid {h.get('pid')} on {h.get('host')}, "
                      f"since {h.get('since')}) to finish", file=sys.stderr, flush=True)
                said = True
            time.sleep(poll_s)
    try:
        yield
    finally:
        lock.release()
