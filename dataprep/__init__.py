"""Data preparation before training, torch-free: raw records -> SFT JSONL splits (``launch data sft``),
text -> the memory-mapped token file the trainer reads (``launch data tokens``)."""
