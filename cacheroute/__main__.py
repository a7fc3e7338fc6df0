import sys

from cacheroute.cli import main

sys.exit(main())
