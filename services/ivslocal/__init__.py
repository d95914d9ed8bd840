"""A local, wire-compatible stand-in for the AWS ivs-realtime (Stages) API."""
