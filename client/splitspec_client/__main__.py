from splitspec_client.cli import main

raise SystemExit(main())
