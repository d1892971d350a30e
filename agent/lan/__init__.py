"""LAN mode: an embedded board per agent, mDNS announcements, peer discovery and the peer table."""
