"""One download round (rounds.py: img2dataset started, followed, its shards checked): img2dataset run in
its own process (fetch.py), with the download guards it lacks (guards.py), and
the light module Spark executors and Ray workers unpickle them through (unpickle.py), and what all of
these processes leave out of img2dataset's imports (lean.py: torch, ray, wandb, albumentations). They
belong together: fetch installs the guards, and a worker rebuilds them from unpickle without cloob's weight."""
