"""The data plane: chunk pool, manifests, volume and file-tree capture, diff-restore.

Knows bytes and files only: no HTTP, no database.
"""
