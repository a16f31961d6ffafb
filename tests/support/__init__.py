"""Shared test infrastructure: the real Postfix, vectors and the raw proxymap client."""
