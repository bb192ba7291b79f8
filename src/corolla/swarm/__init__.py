"""The swarm layer: the only package that touches ``hivemind.DHT``."""
