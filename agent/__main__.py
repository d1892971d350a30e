"""``python -m agent ...`` runs the panal CLI (what the service units start)."""

from agent.cli import main

main()
