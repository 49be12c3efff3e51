"""Converters: a Hugging Face dataset -> a fastload dataset directory; installed as fastload.converters."""
