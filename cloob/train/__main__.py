"""`python -m cloob.train <recipe> [section.field=value ...]`, also as torchrun's `-m cloob.train`."""

import sys

from cloob.train.loop import main

if __name__ == "__main__":
    sys.exit(main())
