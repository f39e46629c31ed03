"""What every package needs and none owns: the user-error type, atomic file writes, value checks."""
