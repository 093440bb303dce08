"""The checkpoint registry: entries with lineage, and aliases that move atomically.

    store.py              entries and alias events on a folder or any fsspec URL, safe with many writers
    lineage.py            where a checkpoint came from (its folder, the run's recipe, the dataset's
                          manifest), read without torch
    promotion.py          champion or challenger: a new model against the champion on the same sets, the
                          paired bootstrap, the decision kept in the alias's history
    command.py            `cloob registry` (register, list, show, resolve, alias, best, promote, history)
    reference_import.py   `cloob import ml-jku-cloob`: the paper's published checkpoints as ours, registered
"""

from cloob.registry.store import Registry, RegistryError  # noqa: F401
