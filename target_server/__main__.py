from target_server.cli import main

raise SystemExit(main())
