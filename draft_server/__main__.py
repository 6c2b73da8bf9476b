from draft_server.cli import main

raise SystemExit(main())
