"""The review web app (issue 5): worklist, series pages with quality maps, verdicts,
JSON API under ``/api`` with OpenAPI docs at ``/docs``, ``/healthz`` and ``/metrics``.

FastAPI with server-rendered Jinja templates and a little plain JavaScript. Layout, after
full-stack-fastapi-template: :mod:`qgate.web.app` (factory), :mod:`qgate.web.deps` (typed
dependencies), :mod:`qgate.web.routes` (one router per resource), :mod:`qgate.web.crud`
(data access), :mod:`qgate.web.schemas` (API models), :mod:`qgate.web.security`.

What an operator can do to a series (:mod:`qgate.web.actions`) and the review app's users
(:mod:`qgate.web.users`) live here too; the command line uses both. This module imports
nothing, so ``qgate users`` and ``qgate release`` do not load the app: build it with
:func:`qgate.web.app.create_app`, serve it with :func:`qgate.web.server.start_web`.
"""
