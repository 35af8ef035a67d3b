"""The pure core of tandem: ids, the application lifecycle, job states, image kinds and rules.

Nothing in this package performs I/O (no files, network, database or clock reads beyond
random id generation); every function is deterministic in its arguments, so the rules can be
tested exhaustively and reused by the catalog, the job runner and the operations alike.
"""
