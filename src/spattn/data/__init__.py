"""Offline text for evaluation: Debian-packaged corpora (Austen, King James Bible), local files, token chunks."""

from spattn.data.cache import cache_dir
from spattn.data.chunks import chunk, text_chunks, tokenize
from spattn.data.corpora import CORPORA, corpus_info, corpus_path, load_text, prepare

__all__ = ["CORPORA", "cache_dir", "chunk", "corpus_info", "corpus_path", "load_text", "prepare", "text_chunks",
           "tokenize"]
