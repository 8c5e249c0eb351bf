import sys

from zroute.cli import main

sys.exit(main())
