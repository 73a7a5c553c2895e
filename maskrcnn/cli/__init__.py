"""The ``maskrcnn`` command line: the parser (main.py), what each subcommand does (commands.py), the demo."""
