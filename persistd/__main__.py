import sys

from persistd.service import main

sys.exit(main())
