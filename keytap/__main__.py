"""`python -m keytap` runs the CLI."""

import sys

from keytap.cli import main

sys.exit(main())
