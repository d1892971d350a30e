"""Results you can trust: instances of a unit, quorum validation, adaptive replication, reputation, credit.

See :mod:`hub.trust.trust` for the board part that wires them; ARCHITECTURE.md for the map.
"""
