"""SLA engine: definitions (YAML), burn-rate math and evaluation (pure), delivery to Alertmanager or webhooks.

Pure modules: ``definitions``, ``burnrate``, ``evaluate``, ``payloads``. IO: ``alertmanager``, ``webhook``,
``service`` (the evaluation job in ``tower serve``'s scheduler).
"""
