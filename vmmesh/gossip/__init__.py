"""Gossip: a pure Scuttlebutt core, a failure detector, a simulator and a trio driver."""
