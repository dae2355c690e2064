"""`python -m lmoec ...` is the `lmoec` command."""
import sys

from .cli import main

sys.exit(main())
