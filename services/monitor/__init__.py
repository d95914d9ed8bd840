"""The monitor: what IVS really sees of the cluster's Stages, reported to the allocator and stage manager."""
