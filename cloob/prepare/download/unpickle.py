"""How a Spark executor or Ray worker rebuilds cloob's GuardedDownloader: a module light enough to
run before img2dataset is imported there.

Nothing in a download worker uses torch, but webdataset (under img2dataset's writer) imports it when
it can: ~3 s of CPU and ~300 MB in every worker process. These processes run only this job's
tasks, so torch is made unimportable there first, as cloob.prepare.download.fetch does for its own pool.
"""

from __future__ import annotations

import os
import sys


def guarded_downloader(state: bytes):
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations phones home at import
    if "torch" not in sys.modules:
        sys.modules["torch"] = None
    import pickle

    from cloob.prepare.download.guards import GuardedDownloader  # installs the guards in this process

    downloader = GuardedDownloader.__new__(GuardedDownloader)
    downloader.__dict__.update(pickle.loads(state))
    return downloader
