"""Builders shared by the test suite (not tests themselves; on the path via pytest's ``pythonpath``)."""
