"""The wire contract between clients and servers; imports neither side."""
