"""Dashboard entry point (pages arrive with the dashboard issue); reads only from the API."""

from __future__ import annotations

import os

import httpx
import streamlit as st

API = os.environ.get("TOWER_API_URL", "http://127.0.0.1:8000")

st.set_page_config(page_title="Revenue Control Tower", layout="wide")
st.title("Revenue Control Tower")
try:
    ready = httpx.get(f"{API}/readyz", timeout=3).json()
    st.success(f"API at {API}: {ready.get('status')} ({ready.get('backend')} store)")
except httpx.HTTPError as exc:
    st.error(f"The API at {API} is not reachable ({type(exc).__name__}). Start it with `tower serve`.")
