"""The neutral base layer: errors, settings and the bucket key rule; it imports nothing of CodeTune's."""
