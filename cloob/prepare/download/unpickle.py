"""How a Spark executor or Ray worker rebuilds cloob's GuardedDownloader: a module light enough to
run before img2dataset is imported there.

These processes run only this job's tasks, so what a download never uses (torch above all: ~3 s of
CPU and ~300 MB in every worker) is cut there first, as cloob.prepare.download.fetch does for its own
pool (cloob.prepare.download.lean).
"""

from __future__ import annotations


def guarded_downloader(state: bytes):
    import pickle

    from cloob.prepare.download.lean import make_lean

    make_lean()  # a Ray worker has imported ray already, and keeps it

    from cloob.prepare.download.guards import GuardedDownloader  # installs the guards in this process

    downloader = GuardedDownloader.__new__(GuardedDownloader)
    downloader.__dict__.update(pickle.loads(state))
    return downloader
