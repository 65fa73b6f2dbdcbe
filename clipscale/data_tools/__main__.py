import sys

from clipscale.data_tools.cli import main

sys.exit(main())
