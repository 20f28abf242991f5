"""``python -m analysis``: the loopscope command line (see analysis/cli.py)."""
from .cli import main

raise SystemExit(main())
