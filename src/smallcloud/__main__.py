import sys

from smallcloud.cli import main

sys.exit(main())
