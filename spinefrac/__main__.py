from spinefrac.cli import main

raise SystemExit(main())
