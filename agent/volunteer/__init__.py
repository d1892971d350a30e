"""The volunteer's say: preferences, the pause rules built on them, and the local control socket."""
