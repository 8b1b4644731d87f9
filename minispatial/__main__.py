import sys

from minispatial.cli import main

sys.exit(main())
