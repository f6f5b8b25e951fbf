"""`python3 -m s3repofs`: the same command line as `s3repofs`."""

import sys

from .cli.main import main

sys.exit(main())
