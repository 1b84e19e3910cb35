"""`python -m rnnkit ...` (and `torchrun ... -m rnnkit train ...`) is the `rnnkit` command."""

import sys

from rnnkit.cli.main import main

sys.exit(main())
