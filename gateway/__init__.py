"""The public HTTP surface: REST for the pages over the allocator and stage manager gRPC services."""
