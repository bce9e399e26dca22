"""The sensitivity-based mix: measuring, allocating, error-feedback ratios, the plan's report."""
