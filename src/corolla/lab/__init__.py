"""Tools that build a swarm's surroundings on one machine, for tests, benchmarks and by hand."""
