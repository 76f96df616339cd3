"""The loraplex gateway: HTTP API, auth, registry access, routing to workers. Never imports torch."""
