"""``python -m fusedbn.bench``: see ``fusedbn.bench``."""
import sys

from .cli import main

sys.exit(main())
