"""intake stage: every `tuning.requested` becomes a `queued` job at once (light: no torch, no trainer)."""
