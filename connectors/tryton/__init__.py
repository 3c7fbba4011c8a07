"""Tryton as the ERP: JSON-RPC client implementing ErpConnector."""
