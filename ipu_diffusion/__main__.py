import sys

from ipu_diffusion.cli import main

sys.exit(main())
