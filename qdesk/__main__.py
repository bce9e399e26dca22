from qdesk.cli import main

raise SystemExit(main())
