"""`python -m modelkin` runs the CLI."""

from modelkin.cli import main

raise SystemExit(main())
