"""Presets: each module's ``override(config, stage)`` changes the base config's defaults."""
