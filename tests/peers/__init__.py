"""Reusable OTLP test peers (an in-process sink and a rotel collector) for end-to-end tests."""
