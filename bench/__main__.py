"""``python -m bench [--suite decode,embed,...] [--quick] [--out DIR]``: see bench/README.md."""

from bench.suite import main

raise SystemExit(main())
