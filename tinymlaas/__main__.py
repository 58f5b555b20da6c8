import sys

from tinymlaas.cli import main

sys.exit(main())
