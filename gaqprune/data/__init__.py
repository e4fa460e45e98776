"""Text: the embedded Wikipedia corpus, text sources, tokenization, token windows and the Lightning datamodule."""
