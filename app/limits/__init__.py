"""Rate limits, upstream back-pressure and per-key policy: what may run now, and what must wait or be refused."""
