"""``python -m servelm.server serve ...`` / ``python -m servelm.server keys ...``."""
import sys

from servelm.server.cli import main

sys.exit(main())
