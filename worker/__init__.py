"""Celery workers that fill gradient stores: `worker.app` (the app), `worker.tasks` (the shard task),
`worker.jobs` (submit, follow and cancel a store's indexing job). Configured by `worker.settings`."""
