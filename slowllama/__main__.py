from slowllama.cli import main

raise SystemExit(main())
