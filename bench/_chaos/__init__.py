"""Shared parts of the chaos runs: the agent swarm (tests/test_chaos_*.py and lab/chaos) and its figures."""
