import sys

from salora_cli.main import main

sys.exit(main())
