"""Typed HTTP clients for the appliance, agent and peer APIs (httpx, pinned TLS)."""
