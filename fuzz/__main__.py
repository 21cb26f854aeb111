"""`python -m fuzz`: see fuzz.cli."""
import sys

from .cli import main

sys.exit(main())
