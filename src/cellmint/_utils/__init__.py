"""Shared plumbing: chunked reading, logging, resource reports, docstring fragments."""
