"""``python -m onnxq`` is the ``onnxq`` command."""

import sys

from onnxq.cli import main

sys.exit(main())
