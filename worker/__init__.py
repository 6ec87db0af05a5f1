"""Celery workers that fill gradient stores: `worker.app` (the app), `worker.tasks` (the shard task),
`worker.control` (submit, follow and cancel a store's indexing job). Configured by `worker.settings`."""
