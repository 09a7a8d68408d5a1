"""What the tests share: checkpoint writers, oracles, a local Hub, CLI runners."""
