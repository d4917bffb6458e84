import sys

from maskjax.cli import console

sys.exit(console())
