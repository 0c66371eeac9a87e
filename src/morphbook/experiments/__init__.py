"""One experiment module per chapter: ``Config.for_profile(profile, **overrides)`` -> ``run(cfg)`` -> ``Result``."""
