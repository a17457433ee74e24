"""``python -m pullwake`` runs the CLI."""

from pullwake.cli import main

raise SystemExit(main())
