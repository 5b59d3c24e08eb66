"""embedq storage package."""
