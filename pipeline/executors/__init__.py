"""Running stage one: the ``proposals`` command, the per-shard worker, batches as work units, and
the local and Ray executors with the locked-down Ray cluster."""
