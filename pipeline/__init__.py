"""The metagradient data-selection experiment."""
