"""TPU kernels: Pallas splash attention (`splash.splash_attention`)."""
