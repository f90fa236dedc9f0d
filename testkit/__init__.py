"""What tests and benchmarks share: a fault-injecting fake upstream, a gateway on a loopback port, a fake clock."""
