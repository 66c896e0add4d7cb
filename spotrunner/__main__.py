from spotrunner.cli import main

raise SystemExit(main())
