"""Shared-memory plumbing between perpx processes: regions, rings, snapshots, wait strategies.

No business rules live here: records and tables are numpy dtypes chosen by the caller.
"""
