"""panal's machine side and command line: the volunteer daemon and its parts, board clients, LAN mode, the CLI."""
