"""The format's version, and what each version added: one table, named, so that no reader
compares ``format_version`` with a bare number."""
FORMAT_VERSION = 4
READABLE_VERSIONS = (1, 2, 3, 4)  # 1 reads as 2 with every split 'jpeg'; 1 and 2 have no per-sample checksums
# the first version that has each feature
RAW_FROM_VERSION = 2            # raw pixels (a split's ``image_codec``)
CHECKSUM_FROM_VERSION = 3       # a CRC32C per sample (records index) and the manifest's own sha256
CHUNK_HASHES_FROM_VERSION = 4   # a sha256 per chunk of a .beton (``chunk_size`` / ``chunk_sha256``)
