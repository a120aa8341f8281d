"""Scanning, decoding and resizing, the shard schema, manifest and report (Ray, pyarrow).

Never imports `workflows`.
"""
