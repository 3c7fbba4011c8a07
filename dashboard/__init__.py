"""Streamlit dashboard; it talks only to the API."""
