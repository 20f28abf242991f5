"""Training and evaluating the sample models: ``train`` (``python -m analysis.training.train``),
``evaluate`` (held-out accuracy, bits per character) and ``cards`` (the README's model table)."""
