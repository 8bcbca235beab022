"""``python -m otel_ml.cli``: the ``otel-ml`` command without the installed entry point."""

import sys

from otel_ml.cli.main import main

sys.exit(main())
