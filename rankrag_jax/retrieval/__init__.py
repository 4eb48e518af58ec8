"""Retrieval for RankRAG: a passage corpus, BM25 (bm25s), and dense retrieval (Flax BERT encoder + faiss).

  corpus.py  Corpus (columns of ids/titles/texts), read_corpus_jsonl, passage_text, CorpusError
  bm25.py    build_bm25_index, search_bm25, save_bm25_index / load_bm25_index
  bert.py    BertEncoder (Flax), HF safetensors import, load_sentence_encoder, encode_texts
  dense.py   embed_corpus, build_dense_index (flat | ivf | hnsw), search_dense, save/load, DenseRetriever

Both retrievers return, for a batch of queries, passage ids `[Q, k]` and scores `[Q, k]`, best first;
`Corpus.passages_by_id` turns ids into the passage texts the ranker and generator read.

    >>> from rankrag_jax.retrieval import bm25, corpus, dense
    >>> passages = corpus.read_corpus_jsonl("wiki.jsonl")
    >>> ids, scores = bm25.search_bm25(bm25.build_bm25_index(passages), ["who wrote hamlet?"], k=100)
    >>> ids, scores = dense.build_dense_retriever(passages).search(["who wrote hamlet?"], k=100)

Submodules are imported explicitly (nothing here), so reading a corpus does not load jax or faiss.
"""
