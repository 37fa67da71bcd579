from agml.cli import main

raise SystemExit(main())
