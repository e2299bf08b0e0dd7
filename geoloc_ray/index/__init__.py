"""Gallery index: expert embeddings concatenated per image, in faiss (exact or ANN), optionally sharded."""
