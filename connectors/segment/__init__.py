"""Segment / RudderStack as the CDP: HTTP Tracking API payloads -> profile-change business events."""
