"""The versioned API: every resource's router under one prefix."""

from fastapi import APIRouter

from service.api.routes import attribute, diagnostics, generate, health, indexes, jobs, samples

API_PREFIX = "/v1"

api_router = APIRouter(prefix=API_PREFIX)
for module in (health, indexes, jobs, attribute, generate, samples, diagnostics):
    api_router.include_router(module.router)
