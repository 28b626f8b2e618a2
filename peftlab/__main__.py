"""``python -m peftlab``: see :mod:`peftlab.cli`."""

from peftlab.cli import main

raise SystemExit(main())
