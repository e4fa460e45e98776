"""Self-contained model code copied into every pruned checkpoint (imports only torch + transformers).

gaqprune's own loader imports these same files, so the checkpoint and the package never disagree.
"""
