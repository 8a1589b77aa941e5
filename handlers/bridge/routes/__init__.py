"""The bridge's HTTP routers, one per concern."""
