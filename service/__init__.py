"""The attribution REST service and web page: `service.main.create_app` builds the FastAPI app."""
