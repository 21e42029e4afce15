"""``python -m npvae``: the same as the ``npvae`` command."""
import sys

from .cli import main

sys.exit(main())
