"""`python -m recsys.cli`: the `recsys` command."""

from recsys.cli import main

raise SystemExit(main())
