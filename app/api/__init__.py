"""The HTTP layer: thin routers over the completion service, the scheduler and the backend."""
