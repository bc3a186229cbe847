"""`python -m gateway --prefix ... --source-index ... --server-key ... --accounts ... --markets ...`"""

import sys

from gateway.server import main

sys.exit(main())
