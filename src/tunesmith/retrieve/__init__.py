"""Retrieval for RAG: passages (corpus.py), the embedder (embed.py), rankers (stores.py), the persisted index
and its search (index.py), and the one way retrieved passages enter a prompt (prompt.py)."""
