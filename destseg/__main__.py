from destseg.cli import main

raise SystemExit(main())
