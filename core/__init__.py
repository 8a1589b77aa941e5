"""CodeTune's neutral base: errors, settings, dataset formats; imports nothing of ours."""
