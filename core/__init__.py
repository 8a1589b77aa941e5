"""The neutral base layer: errors, settings, the bucket key rule, the dataset formats; imports nothing of ours."""
