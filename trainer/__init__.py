"""Job side: code that runs inside the training job (imports torch)."""
