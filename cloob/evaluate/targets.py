"""What to evaluate, by the names people use: prepared downstream sets by name (or `all`) under a
store's downstream/ folder, and checkpoints by path or URL, or by registry alias or entry id.

Shared by `cloob evaluate` and the evaluate-checkpoints flow, so both accept the same names.
"""

from __future__ import annotations

import posixpath

from cloob.errors import CloobError
from cloob.names import check_name


def prepared_sets(downstream: str, names: list[str]) -> list[tuple[str, str]]:
    """[(name, uri)] of prepared sets under `downstream`; `all` is every prepared one. CloobError
    naming the set and the command that prepares it, for one that is not there."""
    from cloob.evaluate.sets.manifest import read_manifest
    from cloob.evaluate.sets.spec import list_downstream_specs

    names = list(names)
    if names == ["all"]:
        names = [n for n in list_downstream_specs(generated=True) if read_manifest(downstream, n) is not None]
        if not names:
            raise CloobError(f"no prepared downstream set in {downstream}",
                             f"prepare some first: cloob prepare-downstream all --out {downstream}")
    else:
        for name in names:
            check_name(name, "downstream set name")  # <downstream>/<name>/ is read
            if read_manifest(downstream, name) is None:
                raise CloobError(f"{name} is not prepared in {downstream}",
                                 f"cloob prepare-downstream {name} --out {downstream} (or --downstream <root>)")
    return [(name, posixpath.join(downstream, name)) for name in names]


def _looks_like_a_location(model: str) -> bool:
    import os

    return "/" in model or "=" in model or ":" in model or model.startswith((".", "~")) or os.path.exists(model)


def resolve_models(models: list[str], registry: str) -> list[str]:
    """Each model as given when it is a location (a run or checkpoint folder, a URL, ARCH=weights),
    else the checkpoint that `registry` knows by that alias or entry id (`latest`, `best-flowers102`,
    `ac5a682b1301`)."""
    out = []
    for m in models:
        if _looks_like_a_location(m):
            out.append(m)
            continue
        from cloob.registry import Registry
        from cloob.registry.store import RegistryError

        try:
            out.append(Registry(registry).resolve(m)["checkpoint_uri"])
        except RegistryError as e:
            raise CloobError(f"{m!r} is neither a checkpoint folder nor known to the registry {registry}",
                             f"give a run or checkpoint folder (or URL), or {e.fix}") from None
    return out
