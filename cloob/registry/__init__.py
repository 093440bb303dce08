"""The checkpoint registry: entries with lineage, and aliases that move atomically.

    store.py              entries and alias events on a folder or any fsspec URL, safe with many writers
    reference_import.py   `cloob import ml-jku-cloob`: the paper's published checkpoints as ours, registered
"""

from cloob.registry.store import Registry, RegistryError  # noqa: F401
