"""Stage 2: train the detector from cached soft labels (``lt-distill train``) and evaluate it."""
