"""The HDF5 shard format (schema v1) and everything about a proposals folder: the plan and its
fingerprint, integrity checks, reading, whether a folder is finished, and --overwrite staging."""
