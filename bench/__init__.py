"""fluxmq benchmarks: load generator, side-by-side comparison with Mosquitto, locust scenarios."""
