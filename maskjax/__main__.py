import sys

from maskjax.cli import main

sys.exit(main())
