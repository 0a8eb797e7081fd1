//! OpenAI-compatible HTTP backend (vLLM, SGLang, llama.cpp).
