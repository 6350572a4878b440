"""Fleet simulation scenarios (TOML) and their runner."""
