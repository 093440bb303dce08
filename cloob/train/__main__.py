"""`python -m cloob.train <recipe> [section.field=value ...]`, also as torchrun's `-m cloob.train`."""

import sys

if __name__ == "__main__":
    from cloob.architectures import skip_timm_for_args

    skip_timm_for_args(sys.argv[1:])
    from cloob.train.loop import main

    sys.exit(main())
