"""Cache policies besides InvarDiff's calibrated plans: Learning-to-Cache and DiCache."""
