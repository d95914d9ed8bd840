"""Signed, at-least-once webhooks to the host app (Standard Webhooks), from an outbox that survives
restarts."""
