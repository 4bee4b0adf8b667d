"""Who is this pid / cgroup: lookups with caches, never blocking the event loop."""
