import sys

from leukoscope.cli import main

sys.exit(main())
