"""What a quantized variant costs: held-out text, KL divergence, task suites, the report."""
