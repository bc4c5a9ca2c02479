"""gapwatch proxy: server, routing, streaming relay, policy, telemetry and the simulated upstream."""
