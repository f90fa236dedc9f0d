"""Replicas: gateways that share one queue, the backends' slots and every quota through Redis (REDIS_URL)."""
