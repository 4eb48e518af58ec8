"""Hardware-specific attention kernels behind the model's one attention dispatcher."""
