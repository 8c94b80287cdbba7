import sys

from dcam.pipeline.cli import main

sys.exit(main())
