"""GPU kernels: Pallas (Triton) flash attention with packed segments (`flash.gpu_flash_attention`)."""
