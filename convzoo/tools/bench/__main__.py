import sys

from convzoo.tools.bench.cli import main

sys.exit(main())
