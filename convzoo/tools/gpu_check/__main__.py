import sys

from convzoo.tools.gpu_check.cli import main

sys.exit(main())
