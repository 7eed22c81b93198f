"""lenskit: mechanistic interpretability of transformers, as TransformerLens hook functions."""
