"""This machine: its capabilities, the agent's home directory, and installing the agent as a service."""
