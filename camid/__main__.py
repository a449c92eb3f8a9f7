from camid.cli import main

raise SystemExit(main())
