"""`python -m bench` from the repo root: the same CLI as the `decodebench` console script."""

from bench.commands.cli import main

raise SystemExit(main())
