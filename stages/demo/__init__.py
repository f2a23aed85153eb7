"""The built-in end-to-end example (``lt-distill demo``) and its synthetic long-tailed dataset."""
