import sys

from servelm.cli import main

sys.exit(main())
