"""HTTP routers: probes and metrics (open), ingest and state (bearer token)."""
