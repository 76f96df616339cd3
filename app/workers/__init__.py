"""How the gateway reaches workers: one client interface, local processes and remote URLs alike."""
