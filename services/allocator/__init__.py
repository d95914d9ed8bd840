"""Allocator: viewer leases, least-loaded placement across a room's Stages, participant tokens."""
