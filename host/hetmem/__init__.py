"""hetmem."""
