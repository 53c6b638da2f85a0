"""Causal language models: load, data, packing, chunked loss, training (SFT/continued pretraining/DPO), merge, chat."""
