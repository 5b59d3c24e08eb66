"""embedq tasks package."""
