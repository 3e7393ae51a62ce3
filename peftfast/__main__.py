import sys

from peftfast.cli import main

sys.exit(main())
