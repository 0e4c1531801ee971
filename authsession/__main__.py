"""``python -m authsession``."""

from authsession.cli import main

raise SystemExit(main())
