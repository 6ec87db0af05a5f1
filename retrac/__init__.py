"""retrac's engine: models, losses, noise, per-sample gradients, projections, index plans, query
vectors, scoring, training, datasets and evaluation.

The layering rule: the engine knows nothing of HTTP, queues or the gradient store. It imports only
`api_schemas` (the shared contract) and third-party numerics (torch, diffusers, numpy, ...); never
`storage`, `worker`, `service`, `cli`, nor fastapi, celery, redis or uvicorn. Those packages sit above
it and call into it (`cli -> service, worker -> storage -> retrac -> api_schemas`);
`tests/test_layering.py` checks every import, at module level or inside a function.
"""
