"""``python -m protokern.train``: see ``python -m protokern.train --help``."""

import sys

from protokern.train.main import main

if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(130)
