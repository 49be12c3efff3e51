"""The dataset directory contract (FORMAT.md), the ground floor of fastload: the manifest, the
records index, TFRecord framing, the ``.beton`` layout and its writer, and the bulk writer under it.

Converters write it, pipelines read it; it imports nothing from fastload's other folders.
"""
