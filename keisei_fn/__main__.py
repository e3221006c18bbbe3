"""``python -m keisei_fn``: the same as the ``keisei-fn`` command."""

from keisei_fn.cli import main

raise SystemExit(main())
