"""`python -m gateway --spec exchange.json --index N --server-key ...`: one gateway process."""

import sys

from gateway.server import main

sys.exit(main())
