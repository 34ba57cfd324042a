"""The image file: segments, header, block payloads, index, summary, footer (docs/FORMAT.md)."""
