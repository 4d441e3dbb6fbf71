"""Machinery for bench/gateway.py: a stand-in engine, a bare pass-through proxy, an open-loop load generator.

Kept in a package so that `make bench`, which runs bench/*.py, does not run these helpers as scripts.
"""
