"""Shared machinery for the orchestratord benchmarks (bench/heartbeat.py, bench/placement.py).

Kept in a package so that `make bench`, which runs bench/*.py, does not run these helpers as scripts.
"""
