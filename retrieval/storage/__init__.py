"""Persistence: the SQL schema (ORM), the store (the source of truth), the FAISS index (a derived
cache of the stored vectors) and the ingest-job queue."""
