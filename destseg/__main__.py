"""``python -m destseg``: the command line."""

from destseg.cli import main

raise SystemExit(main())
