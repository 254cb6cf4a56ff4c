"""Model adapters over diffusers Wan classes."""
