"""`python -m proxyd` is the `proxyd` command."""

from proxyd.cli import main

raise SystemExit(main())
