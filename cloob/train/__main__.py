"""`python -m cloob.train <recipe> [section.field=value ...]`, also as torchrun's `-m cloob.train`."""

import sys


def _skip_timm(argv: list[str]) -> None:
    """Before open_clip is imported: leave timm out if the recipe's architecture does not use it
    (cloob.architectures; about 1.3 s of every rank's start). A recipe that does not load is left
    for the trainer to report."""
    from cloob.architectures import skip_timm_unless_needed
    from cloob.config import load_recipe

    args = [a for a in argv if not a.startswith("-")]
    try:
        arch = load_recipe(args[0], args[1:]).model.arch
    except Exception:  # noqa: BLE001 (reported by main, with its message)
        return
    skip_timm_unless_needed(arch)


if __name__ == "__main__":
    _skip_timm(sys.argv[1:])
    from cloob.train.loop import main

    sys.exit(main())
