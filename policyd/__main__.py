"""`python -m policyd` is the same as the `policyd` command."""

from policyd.cli import main

raise SystemExit(main())
