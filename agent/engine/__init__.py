"""Running tasks: warm worker processes, the worker program and the pipe frames between them."""
