"""`python -m fusionrank_cli ...`: the same as the `fusionrank` console script."""

import sys

from fusionrank_cli.main import main

sys.exit(main())
