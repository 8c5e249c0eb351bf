import sys

from zroute_cli.main import main

sys.exit(main())
