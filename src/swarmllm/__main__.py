"""`python -m swarmllm`: the `swarmllm` command."""

import sys

from swarmllm.cli import main

sys.exit(main())
