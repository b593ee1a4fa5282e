"""`python -m gateway [--host … --port …]`, the same as `oneseek gateway`."""

from __future__ import annotations

from gateway.cli import main

raise SystemExit(main())
