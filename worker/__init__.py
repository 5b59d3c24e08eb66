"""embedq worker package."""
