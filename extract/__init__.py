"""Stage one: extract-features."""
