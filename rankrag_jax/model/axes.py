"""Logical axis names: the one place they are spelled, and the default rules mapping them onto the mesh.

The model annotates every parameter and key activation with these names; `sharding.py` turns the rules into
`NamedSharding`s. Changing how a model is sharded means editing RULES (or overriding them in Gin), never the model.
"""

# Mesh axes (outermost first). `data`: pure data parallel (replicated params); `fsdp`: data parallel with
# parameters and optimizer state sharded (ZeRO-3); `tensor`: Megatron-style tensor parallel within a layer.
DATA, FSDP, TENSOR = "data", "fsdp", "tensor"
MESH_AXES = (DATA, FSDP, TENSOR)

# Parameter axes.
VOCAB = "vocab"
EMBED = "embed"
HEADS = "heads"
KV_HEADS = "kv_heads"
HEAD_DIM = "head_dim"
MLP = "mlp"
LAYERS = "layers"
NORM = "norm"

# Activation axes.
BATCH = "activation_batch"
LENGTH = "activation_length"
ACT_EMBED = "activation_embed"
ACT_HEADS = "activation_heads"
ACT_KV_HEADS = "activation_kv_heads"
ACT_HEAD_DIM = "activation_head_dim"
ACT_MLP = "activation_mlp"
ACT_VOCAB = "activation_vocab"
CACHE_BATCH = "cache_batch"
CACHE_LENGTH = "cache_length"

# Default rules: FSDP shards the embed dimension of every weight; tensor parallelism splits heads, MLP and
# vocab. The batch is split over both data-parallel axes. An axis with no rule (or None) is replicated.
RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    (VOCAB, TENSOR),
    (EMBED, FSDP),
    (HEADS, TENSOR),
    (KV_HEADS, TENSOR),
    (HEAD_DIM, None),
    (MLP, TENSOR),
    (LAYERS, None),
    (NORM, None),
    (BATCH, (DATA, FSDP)),
    (LENGTH, None),
    (ACT_EMBED, None),
    (ACT_HEADS, TENSOR),
    (ACT_KV_HEADS, TENSOR),
    (ACT_HEAD_DIM, None),
    (ACT_MLP, TENSOR),
    (ACT_VOCAB, TENSOR),
    (CACHE_BATCH, (DATA, FSDP)),
    (CACHE_LENGTH, None),
)
