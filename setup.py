"""rankrag_jax: RankRAG (Yu et al., NeurIPS 2024) in JAX/Flax."""
import setuptools

setuptools.setup(
    name="rankrag_jax",
    version="0.1.0",
    description="RankRAG: context ranking + retrieval-augmented generation in one Llama, in JAX/Flax.",
    packages=setuptools.find_packages(include=["rankrag_jax", "rankrag_jax.*"]),
    python_requires=">=3.11",
    install_requires=[
        "jax>=0.7",
        "flax>=0.10",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "seqio>=0.0.19",  # brings tensorflow + tensorflow-text
        "tensorflow-datasets>=4.9",
        "sentencepiece>=0.2",
        "faiss-cpu>=1.8",
        "gin-config>=0.5",
        "bm25s>=0.2",
        "safetensors>=0.4",
        "tokenizers>=0.20",
        "gguf>=0.10",
        "absl-py",
        "numpy",
        "tqdm",
        "tensorboardX",
        "matplotlib",
    ],
    extras_require={
        # torch 2.13.0 is the CPU build on this machine's disk; any other spec pulls CUDA wheels.
        "test": ["torch==2.13.0", "transformers>=4.46", "accelerate", "pytest", "pytest-timeout"],
        "tpu": ["jax[tpu]"],
    },
)
