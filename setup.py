"""rankrag_jax: RankRAG (Yu et al., NeurIPS 2024) in JAX/Flax."""
import setuptools

setuptools.setup(
    name="rankrag_jax",
    version="0.1.0",
    description="RankRAG: context ranking + retrieval-augmented generation in one Llama, in JAX/Flax.",
    packages=setuptools.find_packages(include=["rankrag_jax", "rankrag_jax.*"]),
    # The CPU kernels' C++ sources: compiled on first use by rankrag_jax/backends/cpu/build.py.
    package_data={"rankrag_jax.backends.cpu": ["*.cc", "*.h"]},
    python_requires=">=3.11",
    # Exact versions: the combination this project is tested with (jax/flax/orbax move fast together).
    install_requires=[
        "jax==0.10.2",
        "jaxlib==0.10.2",
        "flax==0.12.8",
        "optax==0.2.8",
        "orbax-checkpoint==0.12.8",
        "seqio==0.0.20",  # brings tensorflow + tensorflow-text
        "tensorflow==2.21.0",
        "tensorflow-datasets==4.9.10",
        "sentencepiece==0.2.3",
        "faiss-cpu==1.15.1",
        "gin-config==0.5.0",
        "bm25s==0.3.16",
        "safetensors==0.8.0",
        "tokenizers==0.23.3",
        "gguf==0.19.0",
        "absl-py",
        "numpy",
        "tqdm",
        "tensorboardX",
        "matplotlib",
        "jinja2",
    ],
    extras_require={
        # torch 2.13.0 is the CPU build on this machine's disk; any other spec pulls CUDA wheels.
        # libtpu lets tests AOT-compile for TPU v5p topologies on this CPU (tests/test_train_compile.py); it is
        # the libtpu release that matches jax 0.10.2. pytest-xdist: the suite runs in two workers (README), so one
        # test's single-threaded XLA compiles overlap another's computation (bench/README.md, session 14).
        # peft: the LoRA adapter export is tested by loading it onto the transformers model (tests/test_lora_export.py).
        "test": ["torch==2.13.0", "transformers==5.23.0", "accelerate==1.15.0", "peft==0.21.2", "libtpu==0.0.42.1",
                 "pytest", "pytest-timeout", "pytest-xdist==3.8.0"],
        "tpu": ["libtpu==0.0.42.1"],
    },
)
