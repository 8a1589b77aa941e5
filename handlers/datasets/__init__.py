"""datasets stage: validate and profile uploaded training files."""
