"""The scheduler: jobs and their states, the bounded priority queue, the backend's slots."""
