"""Stripe as the billing system: signed webhooks -> business events, pulls with the official SDK."""
