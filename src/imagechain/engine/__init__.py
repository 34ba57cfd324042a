"""Backup, restore and verify: pipelines over sources, chain, format and stores."""
