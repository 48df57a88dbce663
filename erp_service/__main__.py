import sys

from erp_service.cli import main

sys.exit(main())
