import sys

from liverlesion.cli import main

sys.exit(main())
