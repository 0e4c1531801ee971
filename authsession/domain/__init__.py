"""Pure domain rules: no FastAPI, Redis or httpx in here."""
