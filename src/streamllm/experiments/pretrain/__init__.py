"""Paper Sec. 3.3 at CPU scale: small Llama-architecture models trained from scratch, vanilla, with a learnable
sink token, and with a zero sink (softmax off by one), then streamed through the engine (``streamllm pretrain``)."""
