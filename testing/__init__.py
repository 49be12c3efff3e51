"""Test support that the suite (tests/) and the scripts (scripts/) share, installed as
``fastload.testing``: an S3-protocol store behind a proxy that injects latency and faults and
counts what it serves (``store_proxy``), and the dataset fuzzer (``fuzzing``). Needs the ``test``
extra; nothing in fastload imports it."""
