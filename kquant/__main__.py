from kquant.cli import main

raise SystemExit(main())
