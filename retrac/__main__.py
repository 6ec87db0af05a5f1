import sys

from retrac.cli import main

sys.exit(main())
