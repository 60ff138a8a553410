import sys

from megabatch.cli import main

sys.exit(main())
