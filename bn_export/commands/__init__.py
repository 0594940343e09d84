"""One module per `bn-export` subcommand: each defines `register(subparsers)` and its handler."""
