"""Settings, the local stack, provisioning, deploy manifests and the `codetune` CLI."""
