"""The collector: OTLP/HTTP and business-event ingest, correlation, durable writes, lookups."""
