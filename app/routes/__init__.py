"""One thin router per feature."""
