//! Causal language models from Hugging Face folders on candle.
