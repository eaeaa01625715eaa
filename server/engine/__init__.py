"""The engine: requests, the paged-KV block manager, the scheduler, the runner and the step loop."""
