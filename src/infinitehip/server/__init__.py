"""OpenAI-compatible server (`pip install infinitehip[server]`)."""
