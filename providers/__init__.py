"""Provider adapters: each turns a canonical (OpenAI-shaped) call into one upstream's API."""
