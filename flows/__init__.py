"""Prefect flows (later issue)."""
