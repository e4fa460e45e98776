"""Reading and writing models: the embedded model, HF folders, hub ids, GGUF files, pruned checkpoints (with the
remote code stock transformers loads them with) and the GGUF export for llama.cpp."""
