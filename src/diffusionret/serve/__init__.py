"""HTTP search service: a FastAPI app factory (:func:`diffusionret.serve.app.create_app`) and a web page.

Imported only by ``diffusionret serve`` and by users who embed the app, so the rest of the library
does not depend on the web stack.
"""
