import sys

from ddkit.cli import main

sys.exit(main())
