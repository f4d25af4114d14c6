"""The Accelerate training loop and the helpers it calls."""
