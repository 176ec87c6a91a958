import sys

from draftflow.cli import main

sys.exit(main())
