"""One pruning run: its stages, its folder and its report."""
