"""Postfix master(8) in Python: the supervisor and the child-side server skeleton.

This package never imports ``proxymap``: it knows how to run *a* service, not which one.
"""
