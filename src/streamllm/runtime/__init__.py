"""The runtime: a stream (``stream``), the token loop (``generate``), perplexity, and the chat built on them."""
