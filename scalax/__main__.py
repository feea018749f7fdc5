import sys

from scalax.cli import main

sys.exit(main())
