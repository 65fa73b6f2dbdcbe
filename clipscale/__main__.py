from clipscale.cli import main

raise SystemExit(main())
